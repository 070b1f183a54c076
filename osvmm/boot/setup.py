"""Load a partition's image and write its boot interface; return the entry state.

One function per entry convention:
  - PVH images: hvm_start_info (memory map from the partition's e820 plan,
    command line, RSDP), entered in 32-bit protected mode;
  - plain ELF64 images: the same start info, plus the identity map and GDT of
    the 64-bit entry convention (RBX = start info);
  - Linux (vmlinux or bzImage): boot_params, see linux.py.
The MP table and ACPI tables describing the partition are written for all.
"""

from __future__ import annotations

from osvmm.arch.x86 import gdt, layout, paging
from osvmm.arch.x86.regs import EntryState, long64_entry, pvh_entry
from osvmm.boot.e820 import e820_map
from osvmm.boot.pvh import build_start_info
from osvmm.errors import ConfigError
from osvmm.loader.elf import load_elf
from osvmm.loader.result import KIND_ELF64, KIND_LINUX64, KIND_PVH, read_image


def check_cmdline(cmdline: str, capacity: int = layout.CMDLINE_MAX) -> bytes:
    """The command line as NUL-terminated bytes; ConfigError if unprintable or too long."""
    if any(not (0x20 <= ord(c) < 0x7F) for c in cmdline):
        raise ConfigError("--append: the command line must be printable ASCII")
    raw = cmdline.encode() + b"\0"
    if len(raw) > capacity:
        raise ConfigError(
            f"--append: the command line is {len(raw) - 1} bytes, at most {capacity - 1} fit"
        )
    return raw


def write_tables(partition) -> int:
    """Write the MP table and ACPI tables; return the RSDP's guest-physical address."""
    from osvmm.boot.tables import build_boot_tables

    tables = build_boot_tables(partition.plan)
    for addr, blob in tables.regions:
        partition.memory.write(addr, blob)
    return tables.rsdp_addr


def write_start_info(partition, rsdp_addr: int) -> int:
    mem = partition.memory
    cmdline = check_cmdline(partition.config.cmdline)
    mem.write(layout.CMDLINE_ADDR, cmdline)
    memmap = [(e.addr, e.size, e.type) for e in e820_map(partition.plan)]
    info, table, _ = build_start_info(
        memmap, layout.PVH_MEMMAP_ADDR, layout.CMDLINE_ADDR, rsdp_addr
    )
    mem.write(layout.PVH_START_INFO_ADDR, info)
    mem.write(layout.PVH_MEMMAP_ADDR, table)
    return layout.PVH_START_INFO_ADDR


def write_long_mode_tables(mem) -> None:
    """The GDT and identity map of the 64-bit entry convention."""
    mem.write(layout.GDT_ADDR, gdt.gdt_bytes(gdt.boot_gdt()))
    mem.write(layout.IDT_ADDR, bytes(8))
    for addr, blob in paging.identity_page_tables():
        mem.write(addr, blob)


def load_and_prepare(partition) -> tuple[object, EntryState]:
    cfg = partition.config
    if cfg.kernel or (cfg.initrd and not cfg.image):
        from osvmm.boot.linux import prepare_linux

        return prepare_linux(partition)
    if cfg.image is None:
        raise ConfigError("nothing to boot: give an IMAGE or --kernel")
    data = read_image(cfg.image)
    image = load_elf(data, partition.memory, cfg.image)
    if image.kind == KIND_LINUX64:
        from osvmm.boot.linux import prepare_linux

        return prepare_linux(partition, image)
    if cfg.initrd:
        raise ConfigError("--initrd needs a Linux kernel; this image is not one")
    rsdp = write_tables(partition)
    start_info = write_start_info(partition, rsdp)
    if image.kind == KIND_PVH:
        return image, pvh_entry(image.entry, start_info)
    assert image.kind == KIND_ELF64
    write_long_mode_tables(partition.memory)
    return image, long64_entry(image.entry, rbx=start_info)
