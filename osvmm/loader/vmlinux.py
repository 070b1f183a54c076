"""Linux vmlinux: recognizing a Linux kernel ELF and the setup header it lacks.

A vmlinux is an ELF64 that ``load_elf`` loads like any other; what makes it
Linux is one of its ELF notes:
  - a note named "Linux" (init/version.c always emits LINUX_ELFNOTE_BUILD_SALT,
    type 0x100, and LINUX_ELFNOTE_LTO_INFO, type 0x101);
  - the Xen note XEN_ELFNOTE_GUEST_OS (type 6) whose desc is "linux"
    (arch/x86/xen/xen-head.S, present when CONFIG_XEN=y, as in Debian's);
or a ``__ksymtab`` section (exported symbols; only kernels have one).
For Linux the VMM uses the 64-bit boot protocol: entry at startup_64, whose
physical address is the ELF e_entry (x86-64 links with ENTRY(phys_startup_64)).

A vmlinux has no real-mode setup header, yet boot_params.hdr must be filled
in: ``default_setup_header`` gives the values a bzImage of the same kernel
would carry, documented field by field.
"""

from __future__ import annotations

from osvmm.loader.setup_header import (
    BOOT_FLAG,
    HDRS_MAGIC,
    LOADED_HIGH,
    LOADER_TYPE_UNDEFINED,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    SetupHeader,
)

LINUX_NOTE_NAME = b"Linux"
XEN_NOTE_NAME = b"Xen"
XEN_ELFNOTE_GUEST_OS = 6
XEN_ELFNOTE_PHYS32_ENTRY = 18

# Defaults for a vmlinux, whose setup header is not in the file.
DEFAULT_PROTOCOL_VERSION = 0x020F  # 2.15: the semantics the VMM follows
# Linux x86 COMMAND_LINE_SIZE is 2048; the header's cmdline_size excludes the NUL.
DEFAULT_CMDLINE_SIZE = 2047
DEFAULT_INITRD_ADDR_MAX = 0x7FFFFFFF  # what every 2.03+ x86-64 kernel reports
DEFAULT_KERNEL_ALIGNMENT = 0x200000  # 2 MiB, CONFIG_PHYSICAL_ALIGN on x86-64


def is_linux_note(name: bytes, ntype: int, desc: bytes) -> bool:
    """Whether one ELF note marks its image as a Linux kernel."""
    if name == LINUX_NOTE_NAME:
        return True
    return (
        name == XEN_NOTE_NAME
        and ntype == XEN_ELFNOTE_GUEST_OS
        and desc.rstrip(b"\0").lower() == b"linux"
    )


def default_setup_header(start: int, end: int) -> SetupHeader:
    """The setup header of a vmlinux loaded at [start, end), for boot_params.hdr.

    boot_flag/header/version: as a 2.15 bzImage carries them, so the kernel's
    sanity checks of boot_params.hdr pass.
    type_of_loader 0xff: an unregistered boot loader.
    loadflags LOADED_HIGH: the kernel is at 1 MiB or above.
    code32_start / pref_address: where the kernel was actually loaded.
    relocatable_kernel 0: the VMM loads the vmlinux at its link address (p_paddr).
    xloadflags XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G: the 64-bit entry is used.
    init_size: end - start (the segments' extent, bss included).
    cmdline_size 2047, initrd_addr_max 0x7fffffff, kernel_alignment 2 MiB: the
    values of every x86-64 kernel of the 2.15 protocol (see the constants).
    """
    hdr = SetupHeader()
    hdr.boot_flag = BOOT_FLAG
    hdr.header = HDRS_MAGIC
    hdr.version = DEFAULT_PROTOCOL_VERSION
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    hdr.loadflags = LOADED_HIGH
    hdr.code32_start = start & 0xFFFFFFFF
    hdr.initrd_addr_max = DEFAULT_INITRD_ADDR_MAX
    hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT
    hdr.relocatable_kernel = 0
    hdr.min_alignment = 21  # log2(2 MiB)
    hdr.xloadflags = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    hdr.cmdline_size = DEFAULT_CMDLINE_SIZE
    hdr.pref_address = start
    hdr.init_size = min(end - start, 0xFFFFFFFF)
    return hdr
