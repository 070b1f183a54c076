"""hvm_start_info bytes parsed back at the offsets of Xen's start_info.h.

xen/include/public/arch-x86/hvm/start_info.h draws the layout:
    0 magic (u32)   4 version (u32)   8 flags (u32)   12 nr_modules (u32)
   16 modlist_paddr (u64)   24 cmdline_paddr (u64)   32 rsdp_paddr (u64)
   40 memmap_paddr (u64)    48 memmap_entries (u32)  52 reserved (u32)   56 end
memory map entry: 0 addr (u64), 8 size (u64), 16 type (u32), 20 reserved (u32): 24 bytes
module list entry: 0 paddr, 8 size, 16 cmdline_paddr, 24 reserved (all u64): 32 bytes
"""

from __future__ import annotations

import struct

from osvmm.arch.x86 import layout
from osvmm.boot.pvh import build_start_info

START_INFO = struct.Struct("<IIIIQQQQII")
MEMMAP_ENTRY = struct.Struct("<QQII")
MODLIST_ENTRY = struct.Struct("<QQQQ")

MEMMAP = [
    (0, 0x9FC00, 1),
    (0x9FC00, 0x400, 2),
    (0xE0000, 0x20000, 3),
    (0x100000, 0xBFF00000, 1),
    (0x1_0000_0000, 0x4000_0000, 1),
]


def test_start_info_fields_at_xen_offsets():
    info, table, mods = build_start_info(
        MEMMAP, layout.PVH_MEMMAP_ADDR, layout.CMDLINE_ADDR, rsdp_addr=0xE0000
    )
    assert len(info) == START_INFO.size == 56
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, reserved = (
        START_INFO.unpack(info)
    )
    assert magic == 0x336EC578
    assert info[:4] == b"\x78\xc5\x6e\x33"  # "xEn3" with the 0x80 bit of the "E" set
    assert version == 1
    assert (flags, nr_modules, modlist, reserved) == (0, 0, 0, 0)
    assert cmdline == layout.CMDLINE_ADDR
    assert rsdp == 0xE0000
    assert memmap == layout.PVH_MEMMAP_ADDR
    assert entries == len(MEMMAP)
    assert mods == b""


def test_memory_map_entries_are_24_bytes_in_order():
    _, table, _ = build_start_info(MEMMAP, layout.PVH_MEMMAP_ADDR)
    assert len(table) == 24 * len(MEMMAP)
    parsed = [MEMMAP_ENTRY.unpack_from(table, 24 * i) for i in range(len(MEMMAP))]
    assert [(a, s, t) for a, s, t, _ in parsed] == MEMMAP
    assert all(r == 0 for *_, r in parsed)


def test_defaults_leave_cmdline_and_rsdp_zero():
    info, _, _ = build_start_info([(0, 0x100000, 1)], 0x6040)
    fields = START_INFO.unpack(info)
    assert (fields[5], fields[6], fields[7], fields[8]) == (0, 0, 0x6040, 1)


def test_module_list():
    info, _, mods = build_start_info(
        MEMMAP,
        layout.PVH_MEMMAP_ADDR,
        modules=[(0x0F00_0000, 0x12345), (0x0F20_0000, 0x1000)],
        modlist_addr=0x6F00,
    )
    fields = START_INFO.unpack(info)
    assert (fields[3], fields[4]) == (2, 0x6F00)
    assert len(mods) == 64
    assert MODLIST_ENTRY.unpack_from(mods, 0) == (0x0F00_0000, 0x12345, 0, 0)
    assert MODLIST_ENTRY.unpack_from(mods, 32) == (0x0F20_0000, 0x1000, 0, 0)


def test_start_info_and_memory_map_fit_their_places_in_low_memory():
    info, table, _ = build_start_info(MEMMAP, layout.PVH_MEMMAP_ADDR)
    assert layout.PVH_START_INFO_ADDR + len(info) <= layout.PVH_MEMMAP_ADDR
    assert layout.PVH_MEMMAP_ADDR % 8 == 0
    assert layout.PVH_MEMMAP_ADDR + len(table) <= layout.ZERO_PAGE_ADDR
