"""GDT entries and their KVM segment form (pure).

The 64-bit entry convention uses the Linux boot protocol's selectors:
0x10 (__BOOT_CS, 64-bit code), 0x18 (__BOOT_DS, flat data), 0x20 (TSS).
"""

from __future__ import annotations

import struct

from osvmm.arch.x86.layout import BOOT_CS, BOOT_DS, BOOT_TSS

# Access bytes and flags as in the Intel SDM vol. 3, 3.4.5.
CODE64_FLAGS_ACCESS = 0xA09B  # G=1, L=1, P=1, DPL 0, S=1, type 0xb (exec/read, accessed)
CODE32_FLAGS_ACCESS = 0xC09B  # G=1, D=1, P=1, S=1, type 0xb
DATA_FLAGS_ACCESS = 0xC093  # G=1, B=1, P=1, S=1, type 0x3 (read/write, accessed)
TSS_FLAGS_ACCESS = 0x008B  # P=1, type 0xb (busy 32/64-bit TSS)


def gdt_entry(flags_access: int, base: int, limit: int) -> int:
    """Pack one 8-byte segment descriptor (flags in bits 12-15 of flags_access)."""
    return (
        ((base & 0xFF000000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
        | ((limit & 0x000F0000) << 32)
        | ((flags_access & 0xF0FF) << 40)
    )


def boot_gdt() -> list[int]:
    """The GDT of the 64-bit entry: null, null, code64 (0x10), data (0x18), TSS (0x20)."""
    return [
        0,
        0,
        gdt_entry(CODE64_FLAGS_ACCESS, 0, 0xFFFFF),
        gdt_entry(DATA_FLAGS_ACCESS, 0, 0xFFFFF),
        gdt_entry(TSS_FLAGS_ACCESS, 0, 0xFFFFF),
    ]


def gdt_bytes(entries: list[int]) -> bytes:
    return struct.pack(f"<{len(entries)}Q", *entries)


def segment_from_entry(entry: int, selector: int) -> dict[str, int]:
    """The kvm_segment fields that describe descriptor ``entry`` loaded with ``selector``."""
    base = ((entry >> 16) & 0xFFFFFF) | ((entry >> 32) & 0xFF000000)
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF0000)
    g = (entry >> 55) & 1
    if g:
        limit = (limit << 12) | 0xFFF
    return {
        "base": base,
        "limit": limit,
        "selector": selector,
        "type": (entry >> 40) & 0xF,
        "present": (entry >> 47) & 1,
        "dpl": (entry >> 45) & 3,
        "db": (entry >> 54) & 1,
        "s": (entry >> 44) & 1,
        "l": (entry >> 53) & 1,
        "g": g,
        "avl": (entry >> 52) & 1,
        "unusable": 0,
    }


def boot_segments() -> dict[str, dict[str, int]]:
    """Segment register contents of the 64-bit entry (cs, data segments, tr)."""
    gdt = boot_gdt()
    return {
        "cs": segment_from_entry(gdt[BOOT_CS >> 3], BOOT_CS),
        "data": segment_from_entry(gdt[BOOT_DS >> 3], BOOT_DS),
        "tr": segment_from_entry(gdt[BOOT_TSS >> 3], BOOT_TSS),
    }


def flat32_segments() -> dict[str, dict[str, int]]:
    """Segment register contents of the PVH entry: flat 32-bit protected mode."""
    return {
        "cs": segment_from_entry(gdt_entry(CODE32_FLAGS_ACCESS, 0, 0xFFFFF), BOOT_CS),
        "data": segment_from_entry(gdt_entry(DATA_FLAGS_ACCESS, 0, 0xFFFFF), BOOT_DS),
        "tr": segment_from_entry(gdt_entry(TSS_FLAGS_ACCESS, 0, 0xFFFFF), BOOT_TSS),
    }
