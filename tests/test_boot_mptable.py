"""The MP table, read back by a parser written here from the MP specification 1.4.

The parser imports nothing from the builder: offsets and sizes are the spec's
(section 4: floating pointer 16 bytes, header 44 bytes, processor entries 20
bytes, all other entries 8 bytes).
"""

from __future__ import annotations

import struct

import pytest

from osvmm.arch.x86 import layout
from osvmm.boot.mptable import build_mptable
from osvmm.machine import Machine

MiB = layout.MiB


def parse_mptable(mem: bytes, base: int) -> dict:
    """Parse a floating pointer found in ``mem`` (guest bytes from ``base``) and its table."""
    fp_off = next(off for off in range(0, len(mem), 16) if mem[off : off + 4] == b"_MP_")
    fp = mem[fp_off : fp_off + 16]
    assert sum(fp) % 256 == 0, "floating pointer checksum"
    phys, length, rev = struct.unpack_from("<IBB", fp, 4)
    assert length == 1 and rev == 4
    assert fp[11] == 0, "feature byte 1: a configuration table follows"
    off = phys - base
    sig, base_len, spec, _ = struct.unpack_from("<4sHBB", mem, off)
    assert sig == b"PCMP" and spec == 4
    table = mem[off : off + base_len]
    assert sum(table) % 256 == 0, "configuration table checksum"
    oem, product = struct.unpack_from("<8s12s", table, 8)
    count, lapic_addr = struct.unpack_from("<HI", table, 34)
    out = {
        "fp_addr": base + fp_off,
        "table_end": phys + base_len,
        "oem": oem,
        "lapic_addr": lapic_addr,
        "count": count,
        "cpus": [],
        "buses": [],
        "ioapics": [],
        "ints": [],
        "lints": [],
    }
    pos = 44
    for _ in range(count):
        kind = table[pos]
        if kind == 0:
            _, apic_id, ver, flags, sig_, feat = struct.unpack_from("<BBBBII", table, pos)
            out["cpus"].append((apic_id, bool(flags & 1), bool(flags & 2)))
            pos += 20
            continue
        if kind == 1:
            out["buses"].append((table[pos + 1], table[pos + 2 : pos + 8]))
        elif kind == 2:
            _, ioid, ver, flags, addr = struct.unpack_from("<BBBBI", table, pos)
            out["ioapics"].append((ioid, ver, flags, addr))
        elif kind in (3, 4):
            _, itype, flags, bus, irq, dst, pin = struct.unpack_from("<BBHBBBB", table, pos)
            out["ints" if kind == 3 else "lints"].append((itype, flags, bus, irq, dst, pin))
        else:
            raise AssertionError(f"unknown MP entry type {kind}")
        pos += 8
    assert pos == base_len, "entries fill the table exactly"
    return out


def test_two_cpus_parse_back():
    table = build_mptable(Machine(256 * MiB, [0, 1]), layout.MPTABLE_ADDR)
    mp = parse_mptable(table, layout.MPTABLE_ADDR)
    assert mp["fp_addr"] == layout.MPTABLE_ADDR
    assert mp["table_end"] <= layout.MPTABLE_ADDR + 1024  # inside the EBDA's first KiB
    assert mp["oem"] == b"OSVMM   "
    assert mp["lapic_addr"] == 0xFEE00000
    assert mp["cpus"] == [(0, True, True), (1, True, False)]
    assert mp["buses"] == [(0, b"ISA   ")]
    assert mp["ioapics"] == [(2, 0x11, 1, 0xFEC00000)]
    routes = {irq: (pin, flags, dst, itype) for itype, flags, bus, irq, dst, pin in mp["ints"]}
    assert sorted(routes) == [i for i in range(16) if i != 2]
    assert routes[0] == (2, 0, 2, 0)  # PIT: IRQ0 -> pin 2
    assert routes[9] == (9, 0xD, 2, 0)  # SCI: level, active high
    for irq in (1, 3, 4, 8, 12, 14, 15):
        assert routes[irq] == (irq, 0, 2, 0)
    assert mp["lints"] == [(3, 0, 0, 0, 0xFF, 0), (1, 0, 0, 0, 0xFF, 1)]


def test_partition_apic_ids_and_bsp():
    mp = parse_mptable(build_mptable(Machine(64 * MiB, [6, 4, 5])), layout.MPTABLE_ADDR)
    assert mp["cpus"] == [(6, True, True), (4, True, False), (5, True, False)]
    assert mp["ioapics"][0][0] == 7  # one after the highest local APIC ID
    assert {dst for *_, dst, _pin in mp["ints"]} == {7}


@pytest.mark.parametrize("ncpus, fits", [(40, True), (41, False), (255, False)])
def test_size_and_placement(ncpus, fits):
    table = build_mptable(Machine(64 * MiB, list(range(ncpus))[:255]))
    mp = parse_mptable(table, layout.MPTABLE_ADDR)
    assert len(mp["cpus"]) == ncpus
    assert (mp["table_end"] <= layout.MPTABLE_ADDR + 1024) == fits
    # Even 255 processors end far below the ACPI tables, in the reserved low area.
    assert mp["table_end"] <= layout.ACPI_TABLES_ADDR


def test_other_address():
    table = build_mptable(Machine(64 * MiB, [0]), 0xF0000)
    assert parse_mptable(table, 0xF0000)["fp_addr"] == 0xF0000
