"""Linux's zero page: ctypes mirrors of struct boot_params and struct setup_header.

Mirrors arch/x86/include/uapi/asm/bootparam.h (and screen_info.h, apm_bios.h,
ist.h, edd.h) field for field, with the header's names; offsets are asserted
below each structure. ``build_zero_page`` fills one for the 64-bit boot
protocol (Documentation/arch/x86/boot.rst): the loader's setup header (or a
minimal one for a bare vmlinux), the command line and initrd (low halves in
the header, high halves in ext_*), the ACPI RSDP address, and the e820 map.
"""

from __future__ import annotations

import ctypes

from osvmm.boot.e820 import e820_map
from osvmm.errors import ConfigError, ImageError
from osvmm.loader.setup_header import (
    BOOT_FLAG,
    CAN_USE_HEAP,
    HDRS_MAGIC,
    LOADED_HIGH,
    LOADER_TYPE_UNDEFINED,
    SETUP_HEADER_OFFSET,
    SetupHeader,
)
from osvmm.machine import Machine

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


class _Packed(ctypes.LittleEndianStructure):
    _pack_ = 1


class screen_info(_Packed):
    _fields_ = [
        ("orig_x", u8),
        ("orig_y", u8),
        ("ext_mem_k", u16),
        ("orig_video_page", u16),
        ("orig_video_mode", u8),
        ("orig_video_cols", u8),
        ("flags", u8),
        ("unused2", u8),
        ("orig_video_ega_bx", u16),
        ("unused3", u16),
        ("orig_video_lines", u8),
        ("orig_video_isVGA", u8),
        ("orig_video_points", u16),
        ("lfb_width", u16),
        ("lfb_height", u16),
        ("lfb_depth", u16),
        ("lfb_base", u32),
        ("lfb_size", u32),
        ("cl_magic", u16),
        ("cl_offset", u16),
        ("lfb_linelength", u16),
        ("red_size", u8),
        ("red_pos", u8),
        ("green_size", u8),
        ("green_pos", u8),
        ("blue_size", u8),
        ("blue_pos", u8),
        ("rsvd_size", u8),
        ("rsvd_pos", u8),
        ("vesapm_seg", u16),
        ("vesapm_off", u16),
        ("pages", u16),
        ("vesa_attributes", u16),
        ("capabilities", u32),
        ("ext_lfb_base", u32),
        ("_reserved", u8 * 2),
    ]


assert ctypes.sizeof(screen_info) == 0x40
assert screen_info.lfb_width.offset == 0x12
assert screen_info.capabilities.offset == 0x36


class apm_bios_info(_Packed):
    _fields_ = [
        ("version", u16),
        ("cseg", u16),
        ("offset", u32),
        ("cseg_16", u16),
        ("dseg", u16),
        ("flags", u16),
        ("cseg_len", u16),
        ("cseg_16_len", u16),
        ("dseg_len", u16),
    ]


assert ctypes.sizeof(apm_bios_info) == 20


class ist_info(_Packed):
    _fields_ = [("signature", u32), ("command", u32), ("event", u32), ("perf_level", u32)]


assert ctypes.sizeof(ist_info) == 16


class sys_desc_table(_Packed):
    _fields_ = [("length", u16), ("table", u8 * 14)]


assert ctypes.sizeof(sys_desc_table) == 16


class olpc_ofw_header(_Packed):
    _fields_ = [
        ("ofw_magic", u32),
        ("ofw_version", u32),
        ("cif_handler", u32),
        ("irq_desc_table", u32),
    ]


assert ctypes.sizeof(olpc_ofw_header) == 16


class edid_info(_Packed):
    _fields_ = [("dummy", u8 * 128)]


class efi_info(_Packed):
    _fields_ = [
        ("efi_loader_signature", u32),
        ("efi_systab", u32),
        ("efi_memdesc_size", u32),
        ("efi_memdesc_version", u32),
        ("efi_memmap", u32),
        ("efi_memmap_size", u32),
        ("efi_systab_hi", u32),
        ("efi_memmap_hi", u32),
    ]


assert ctypes.sizeof(efi_info) == 32


# struct setup_header: at 0x1f1 in the zero page and in a bzImage. One mirror serves the
# loader (which parses it from a bzImage) and the zero page (which carries it).
setup_header = SetupHeader

assert ctypes.sizeof(setup_header) == 0x26C - SETUP_HEADER_OFFSET
# Offsets as the boot protocol's table gives them (absolute, in the zero page).
assert setup_header.boot_flag.offset + SETUP_HEADER_OFFSET == 0x1FE
assert setup_header.header.offset + SETUP_HEADER_OFFSET == 0x202
assert setup_header.type_of_loader.offset + SETUP_HEADER_OFFSET == 0x210
assert setup_header.ramdisk_image.offset + SETUP_HEADER_OFFSET == 0x218
assert setup_header.cmd_line_ptr.offset + SETUP_HEADER_OFFSET == 0x228
assert setup_header.xloadflags.offset + SETUP_HEADER_OFFSET == 0x236
assert setup_header.cmdline_size.offset + SETUP_HEADER_OFFSET == 0x238
assert setup_header.setup_data.offset + SETUP_HEADER_OFFSET == 0x250
assert setup_header.kernel_info_offset.offset + SETUP_HEADER_OFFSET == 0x268


class boot_e820_entry(_Packed):
    _fields_ = [("addr", u64), ("size", u64), ("type", u32)]


assert ctypes.sizeof(boot_e820_entry) == 20


class edd_info(_Packed):
    """struct edd_info; its struct edd_device_params (74 bytes) is left as bytes."""

    _fields_ = [
        ("device", u8),
        ("version", u8),
        ("interface_support", u16),
        ("legacy_max_cylinder", u16),
        ("legacy_max_head", u8),
        ("legacy_sectors_per_track", u8),
        ("params", u8 * 74),
    ]


assert ctypes.sizeof(edd_info) == 82

E820_MAX_ENTRIES_ZEROPAGE = 128
EDD_MBR_SIG_MAX = 16
EDDMAXNR = 6


class boot_params(_Packed):
    _fields_ = [
        ("screen_info", screen_info),
        ("apm_bios_info", apm_bios_info),
        ("_pad2", u8 * 4),
        ("tboot_addr", u64),
        ("ist_info", ist_info),
        ("acpi_rsdp_addr", u64),
        ("_pad3", u8 * 8),
        ("hd0_info", u8 * 16),
        ("hd1_info", u8 * 16),
        ("sys_desc_table", sys_desc_table),
        ("olpc_ofw_header", olpc_ofw_header),
        ("ext_ramdisk_image", u32),
        ("ext_ramdisk_size", u32),
        ("ext_cmd_line_ptr", u32),
        ("_pad4", u8 * 112),
        ("cc_blob_address", u32),
        ("edid_info", edid_info),
        ("efi_info", efi_info),
        ("alt_mem_k", u32),
        ("scratch", u32),
        ("e820_entries", u8),
        ("eddbuf_entries", u8),
        ("edd_mbr_sig_buf_entries", u8),
        ("kbd_status", u8),
        ("secure_boot", u8),
        ("_pad5", u8 * 2),
        ("sentinel", u8),
        ("_pad6", u8 * 1),
        ("hdr", setup_header),
        ("_pad7", u8 * (0x290 - SETUP_HEADER_OFFSET - ctypes.sizeof(setup_header))),
        ("edd_mbr_sig_buffer", u32 * EDD_MBR_SIG_MAX),
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),
        ("_pad8", u8 * 48),
        ("eddbuf", edd_info * EDDMAXNR),
        ("_pad9", u8 * 276),
    ]


assert ctypes.sizeof(boot_params) == 4096
assert boot_params.apm_bios_info.offset == 0x040
assert boot_params.tboot_addr.offset == 0x058
assert boot_params.ist_info.offset == 0x060
assert boot_params.acpi_rsdp_addr.offset == 0x070
assert boot_params.hd0_info.offset == 0x080
assert boot_params.sys_desc_table.offset == 0x0A0
assert boot_params.olpc_ofw_header.offset == 0x0B0
assert boot_params.ext_ramdisk_image.offset == 0x0C0
assert boot_params.ext_ramdisk_size.offset == 0x0C4
assert boot_params.ext_cmd_line_ptr.offset == 0x0C8
assert boot_params.cc_blob_address.offset == 0x13C
assert boot_params.edid_info.offset == 0x140
assert boot_params.efi_info.offset == 0x1C0
assert boot_params.alt_mem_k.offset == 0x1E0
assert boot_params.e820_entries.offset == 0x1E8
assert boot_params.sentinel.offset == 0x1EF
assert boot_params.hdr.offset == SETUP_HEADER_OFFSET
assert boot_params.edd_mbr_sig_buffer.offset == 0x290
assert boot_params.e820_table.offset == 0x2D0
assert boot_params.eddbuf.offset == 0xD00

# Constants of the boot protocol.
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
# What a bare vmlinux gets for a header: version 2.12 is the one whose fields
# (xloadflags, ext_* via boot_params) we fill.
MINIMAL_HEADER_VERSION = 0x020C
HEAP_END_PTR = 0xFE00  # end of the real-mode setup heap, less 0x200 (unused by the 64-bit entry)


def build_zero_page(
    machine: Machine,
    setup_header_bytes: bytes | None,
    cmdline_addr: int,
    cmdline_len: int,
    initrd_addr: int = 0,
    initrd_size: int = 0,
    rsdp_addr: int = 0,
) -> bytes:
    """The 4096-byte zero page for the 64-bit boot protocol.

    ``setup_header_bytes``: a bzImage's bytes from offset 0x1f1 (at least up
    to the "HdrS" magic; anything past the setup header is ignored), or None
    for a bare vmlinux, which gets a minimal header. ``cmdline_len`` counts
    the command line without its NUL. ``rsdp_addr`` 0 leaves the kernel to scan.
    """
    bp = boot_params()
    hdr = bp.hdr
    if setup_header_bytes is not None:
        raw = bytes(setup_header_bytes[: ctypes.sizeof(setup_header)])
        if len(raw) < setup_header.version.offset:
            raise ImageError(f"setup header of {len(raw)} bytes is too short")
        ctypes.memmove(ctypes.addressof(hdr), raw, len(raw))
        if hdr.header != HDRS_MAGIC or hdr.boot_flag != BOOT_FLAG:
            raise ImageError("setup header lacks the HdrS magic or the 0xAA55 boot flag")
        if hdr.version >= 0x0206 and cmdline_len > hdr.cmdline_size:
            raise ConfigError(
                f"kernel command line of {cmdline_len} bytes exceeds the kernel's "
                f"limit of {hdr.cmdline_size}"
            )
        if initrd_size and hdr.version >= 0x0203:
            above_ok = hdr.version >= 0x020C and hdr.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G
            if initrd_addr + initrd_size - 1 > hdr.initrd_addr_max and not above_ok:
                raise ConfigError(
                    f"initrd at {initrd_addr:#x}+{initrd_size:#x} ends above the kernel's "
                    f"initrd_addr_max {hdr.initrd_addr_max:#x}"
                )
    else:
        hdr.boot_flag = BOOT_FLAG
        hdr.header = HDRS_MAGIC
        hdr.version = MINIMAL_HEADER_VERSION
        hdr.cmdline_size = cmdline_len
    for name, value in (
        ("command line", cmdline_addr),
        ("initrd", initrd_addr),
        ("initrd size", initrd_size),
    ):
        if not 0 <= value < 1 << 64:
            raise ConfigError(f"{name} value {value:#x} does not fit in 64 bits")
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP
    hdr.heap_end_ptr = HEAP_END_PTR
    hdr.cmd_line_ptr = cmdline_addr & 0xFFFF_FFFF
    bp.ext_cmd_line_ptr = cmdline_addr >> 32
    hdr.ramdisk_image = initrd_addr & 0xFFFF_FFFF
    bp.ext_ramdisk_image = initrd_addr >> 32
    hdr.ramdisk_size = initrd_size & 0xFFFF_FFFF
    bp.ext_ramdisk_size = initrd_size >> 32
    bp.acpi_rsdp_addr = rsdp_addr

    entries = e820_map(machine)
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ConfigError(
            f"the e820 map has {len(entries)} entries, more than the zero page's "
            f"{E820_MAX_ENTRIES_ZEROPAGE}"
        )
    bp.e820_entries = len(entries)
    for i, e in enumerate(entries):
        bp.e820_table[i] = boot_e820_entry(e.addr, e.size, e.type)
    return bytes(bp)
