"""Boot is pure: ``prepare(source, machine, cmdline, quirks) -> BootImage``.

It never sees a partition, guest memory or /dev/kvm; the same inputs give the
same bytes. One recipe per entry convention:

  PVH image     the image's segments; MP and ACPI tables; hvm_start_info (its
                memory map is the Machine's e820 map, the command line, the
                RSDP); entered in 32-bit protected mode, EBX = start info
  plain ELF64   the same, plus the identity map and GDT of the 64-bit entry
                convention; RBX = start info
  Linux         (bzImage or vmlinux, Documentation/arch/x86/boot.rst)
                1. the kernel: a bzImage's protected-mode part at its load
                   address, or a vmlinux's segments at their physical addresses
                2. the command line, checked against the kernel's cmdline_size,
                   with ``pci=off`` (the machine has no PCI bus) and the
                   host's quirk words before any ``--`` (init's part)
                3. the initrd, as high as initrd_addr_max and low RAM allow
                4. the MP and ACPI tables, then boot_params (the zero page)
                5. the identity map and GDT; RIP = startup_64, RSI = zero page
"""

from __future__ import annotations

from osvmm.arch.x86 import gdt, layout, paging
from osvmm.arch.x86.regs import long64_entry, pvh_entry
from osvmm.boot.e820 import e820_map
from osvmm.boot.image import NO_QUIRKS, BootImage, BootSource, Quirks, StagedMemory, is_bzimage
from osvmm.boot.pvh import build_start_info
from osvmm.boot.tables import build_boot_tables
from osvmm.errors import ConfigError, ImageError
from osvmm.loader.cmdline import Cmdline, split_init_args
from osvmm.loader.elf import load_elf
from osvmm.loader.result import KIND_ELF64, KIND_LINUX64, KIND_PVH, LoadedImage
from osvmm.machine import Machine


def prepare(
    source: BootSource, machine: Machine, cmdline: str = "", quirks: Quirks = NO_QUIRKS
) -> BootImage:
    """Everything to write into a fresh partition of ``machine`` to boot ``source``."""
    mem = StagedMemory(machine.ram_ranges)
    if source.linux:
        return _prepare_linux(source, machine, cmdline, quirks, mem)
    image = load_elf(source.data, mem, source.name)
    if image.kind == KIND_LINUX64:  # cannot happen: read_boot_source said not Linux
        raise ImageError(f"{source.name}: a Linux kernel; boot it with --kernel")
    raw_cmdline = _build_cmdline(Cmdline(layout.CMDLINE_MAX), cmdline, ())
    mem.write(layout.CMDLINE_ADDR, raw_cmdline)
    rsdp = _write_tables(mem, machine)
    memmap = [(e.addr, e.size, e.type) for e in e820_map(machine)]
    info, table, _ = build_start_info(memmap, layout.PVH_MEMMAP_ADDR, layout.CMDLINE_ADDR, rsdp)
    mem.write(layout.PVH_START_INFO_ADDR, info)
    mem.write(layout.PVH_MEMMAP_ADDR, table)
    if image.kind == KIND_PVH:
        entry = pvh_entry(image.entry, layout.PVH_START_INFO_ADDR)
    else:
        assert image.kind == KIND_ELF64
        write_long_mode_tables(mem)
        entry = long64_entry(image.entry, rbx=layout.PVH_START_INFO_ADDR)
    return BootImage(image, tuple(mem.writes), entry, cmdline=raw_cmdline)


def _prepare_linux(
    source: BootSource, machine: Machine, cmdline: str, quirks: Quirks, mem: StagedMemory
) -> BootImage:
    # Linux's own loaders and tables, imported for a Linux kernel only (start-up time).
    from osvmm.boot.bootparams import build_zero_page
    from osvmm.loader.initrd import place_initrd

    # 1. kernel
    image = _load_kernel(source, mem)
    hdr = image.setup_header
    # 2. command line
    raw_cmdline = _build_cmdline(
        Cmdline.for_setup_header(hdr, layout.CMDLINE_MAX),
        cmdline,
        _platform_words(cmdline) + quirks.cmdline_words,
    )
    mem.write(layout.CMDLINE_ADDR, raw_cmdline)
    # 3. initrd
    initrd_addr = initrd_size = 0
    if source.initrd is not None:
        low_ram_top = min(machine.ram_ranges[0][1], layout.MMIO_HOLE_START)
        initrd_addr = place_initrd(
            low_ram_top, len(source.initrd), hdr.initrd_addr_max, image.footprint_end
        )
        mem.write(initrd_addr, source.initrd)
        initrd_size = len(source.initrd)
    # 4. tables and the zero page
    rsdp = _write_tables(mem, machine)
    zero_page = build_zero_page(
        machine,
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
    entry = long64_entry(image.entry, rsi=layout.ZERO_PAGE_ADDR)
    return BootImage(image, tuple(mem.writes), entry, quirks.cpuid_mask, quirks.notes, raw_cmdline)


def _load_kernel(source: BootSource, mem: StagedMemory) -> LoadedImage:
    if is_bzimage(source.data):
        from osvmm.loader.bzimage import load_bzimage

        return load_bzimage(source.data, mem, source.name)
    image = load_elf(source.data, mem, source.name)
    if image.kind != KIND_LINUX64:
        raise ImageError(f"kernel {source.name}: not a Linux kernel (no Linux ELF note); use IMAGE")
    return image


# What the command line tells Linux about osvmm's machine: it has no PCI bus (as
# Firecracker's default command line says too). Without it Linux looks for one
# through configuration mechanism #1, and on AMD families 0xf-0x12 its GART aperture
# search (arch/x86/kernel/aperture_64.c) reads the configuration space of 256 buses
# x 32 slots, twice: some 34,000 port exits per boot, each a round trip to the VMM.
NO_PCI = "pci=off"


def _platform_words(cmdline: str) -> tuple[str, ...]:
    """``pci=off``, unless the user's kernel parameters say ``pci=`` themselves."""
    kernel_part, _ = split_init_args(cmdline)
    if any(w.startswith("pci=") for w in kernel_part.split()):
        return ()
    return (NO_PCI,)


def _build_cmdline(line: Cmdline, text: str, extra_words: tuple[str, ...]) -> bytes:
    """The command line as the guest reads it (NUL terminated); the VMM's words go
    before a ``--``, since what follows it is init's."""
    try:
        line.insert_str(text)  # checks the user's text as a whole
    except ConfigError as e:
        raise ConfigError(f"--append: {e}") from None
    kernel_part, init_part = split_init_args(text)
    words = [w for w in extra_words if w not in kernel_part.split()]
    if words:
        line = Cmdline(line.capacity)
        line.insert_str(kernel_part)
        for word in words:
            key, eq, value = word.partition("=")
            if eq:
                line.insert(key, value)
            else:
                line.insert_flag(word)
        if init_part or text.split(" ").count("--"):
            line.insert_str("-- " + init_part if init_part else "--")
    return line.as_bytes()


def _write_tables(mem: StagedMemory, machine: Machine) -> int:
    """The MP table and ACPI tables; the RSDP's guest-physical address."""
    tables = build_boot_tables(machine)
    for addr, blob in tables.regions:
        mem.write(addr, blob)
    return tables.rsdp_addr


def write_long_mode_tables(mem) -> None:
    """The GDT and identity map of the 64-bit entry convention."""
    mem.write(layout.GDT_ADDR, gdt.gdt_bytes(gdt.boot_gdt()))
    mem.write(layout.IDT_ADDR, bytes(8))
    for addr, blob in paging.identity_page_tables():
        mem.write(addr, blob)
