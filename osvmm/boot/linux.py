"""Boot a Linux kernel by the 64-bit boot protocol (Documentation/arch/x86/boot.rst).

The recipe, for a bzImage or a vmlinux:
  1. load the kernel (the bzImage's protected-mode part at pref_address, or the
     vmlinux's segments at their physical addresses);
  2. the command line, built and checked against the kernel's cmdline_size,
     plus any host accommodation the probe found needed;
  3. the initrd, placed as high as initrd_addr_max and low RAM allow;
  4. the MP table and ACPI tables, then boot_params (zero page) with the e820
     map, the setup header, the command line, initrd and RSDP addresses;
  5. the identity map and GDT; RIP = startup_64, RSI = the zero page.
"""

from __future__ import annotations

from osvmm.arch.x86 import layout
from osvmm.arch.x86.regs import EntryState, long64_entry
from osvmm.boot.bootparams import build_zero_page
from osvmm.boot.setup import write_long_mode_tables, write_tables
from osvmm.errors import ConfigError, ImageError
from osvmm.loader.bzimage import load_bzimage
from osvmm.loader.cmdline import Cmdline
from osvmm.loader.elf import load_elf
from osvmm.loader.initrd import place_initrd
from osvmm.loader.result import KIND_LINUX64, LoadedImage, read_image

HDRS_OFFSET = 0x202
SETUP_HEADER_OFFSET = 0x1F1


def _load_kernel(partition) -> LoadedImage:
    path = partition.config.kernel or partition.config.image
    data = read_image(path, "kernel")
    if data[HDRS_OFFSET : HDRS_OFFSET + 4] == b"HdrS":
        return load_bzimage(data, partition.memory, path)
    image = load_elf(data, partition.memory, path)
    if image.kind != KIND_LINUX64:
        raise ImageError(f"kernel {path}: not a Linux kernel (no Linux ELF note); use IMAGE")
    return image


def host_accommodations(partition) -> tuple[list[str], list[str]]:
    """(CPUID features to mask, command-line words to add) this host needs, and log them."""
    from osvmm.host_probe import probe_host

    masks, words = [], []
    probes = probe_host()
    if probes["cx16"].needed:
        masks.append("cx16")
        partition.boot_log.append(
            "host accommodation: CPUID CX16 cleared (this host's KVM cannot emulate "
            "cmpxchg16b at CPL0)"
        )
    if probes["xsave"].needed:
        words.append("noxsave")
        partition.boot_log.append(
            "host accommodation: 'noxsave' added to the command line (this host's KVM "
            "cannot emulate xrstor at CPL0)"
        )
    return masks, words


def prepare_linux(partition, image: LoadedImage | None = None) -> tuple[LoadedImage, EntryState]:
    cfg = partition.config
    mem = partition.memory
    # 1. kernel
    if image is None:
        image = _load_kernel(partition)
    hdr = image.setup_header
    # 2. command line
    masks, words = host_accommodations(partition)
    partition.cpuid_mask.extend(masks)
    cmdline = Cmdline.for_setup_header(hdr, layout.CMDLINE_MAX)
    try:
        cmdline.insert_str(cfg.cmdline)
    except ConfigError as e:
        raise ConfigError(f"--append: {e}") from None
    for word in words:
        if word not in cfg.cmdline.split():
            cmdline.insert_str(word)
    raw_cmdline = cmdline.as_bytes()
    mem.write(layout.CMDLINE_ADDR, raw_cmdline)
    # 3. initrd
    initrd_addr = initrd_size = 0
    if cfg.initrd:
        initrd = read_image(cfg.initrd, "initrd")
        low_ram_top = min(partition.plan.ram_ranges[0][1], layout.MMIO_HOLE_START)
        initrd_addr = place_initrd(
            low_ram_top, len(initrd), hdr.initrd_addr_max, image.footprint_end
        )
        mem.write(initrd_addr, initrd)
        initrd_size = len(initrd)
    # 4. tables and the zero page
    rsdp = write_tables(partition)
    zero_page = build_zero_page(
        partition.plan,
        bytes(hdr),
        layout.CMDLINE_ADDR,
        len(raw_cmdline) - 1,
        initrd_addr,
        initrd_size,
        rsdp,
    )
    mem.write(layout.ZERO_PAGE_ADDR, zero_page)
    # 5. machine state
    write_long_mode_tables(mem)
    return image, long64_entry(image.entry, rsi=layout.ZERO_PAGE_ADDR)
