"""ACPI tables: iasl disassembles each one cleanly; an independent parse finds what the plan says.

The iasl tests need Debian's acpica-tools and are skipped with that reason
where it is missing. iasl cannot read an RSDP from a binary file (its header
is not a standard table header), so the RSDP is checked here by hand instead.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from osvmm.arch.x86 import layout
from osvmm.boot.acpi import build_acpi, pm
from osvmm.boot.tables import build_boot_tables
from osvmm.machine import Machine

MiB = layout.MiB
GiB = layout.GiB

needs_iasl = pytest.mark.skipif(
    shutil.which("iasl") is None, reason="iasl is not installed (Debian package acpica-tools)"
)

PLANS = {
    "one-node": Machine(256 * MiB, [0]),
    "two-nodes": Machine.build(256 * MiB, [0, 1], numa_nodes=2),
    "odd-apic-ids": Machine.build(5 * GiB, [4, 5, 9, 12], numa_nodes=3, channels=True),
}


def table_at(blob: bytes, base: int, addr: int) -> bytes:
    off = addr - base
    (length,) = struct.unpack_from("<I", blob, off + 4)
    return blob[off : off + length]


def walk(plan) -> dict[bytes, bytes]:
    """Follow RSDP -> XSDT -> tables -> FADT's DSDT/FACS, as an OS does; checks checksums."""
    acpi = build_acpi(plan)
    blob, base = acpi.data, acpi.addr
    rsdp_off = acpi.rsdp_addr - base
    rsdp = blob[rsdp_off : rsdp_off + 36]
    assert rsdp[:8] == b"RSD PTR "
    assert rsdp_off % 16 == 0 and acpi.rsdp_addr == layout.ACPI_TABLES_ADDR
    assert sum(rsdp[:20]) % 256 == 0, "RSDP checksum"
    assert sum(rsdp) % 256 == 0, "RSDP extended checksum"
    assert rsdp[15] == 2
    (length,) = struct.unpack_from("<I", rsdp, 20)
    (xsdt_addr,) = struct.unpack_from("<Q", rsdp, 24)
    assert length == 36
    found = {}
    xsdt = table_at(blob, base, xsdt_addr)
    assert xsdt[:4] == b"XSDT"
    for addr in struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36):
        t = table_at(blob, base, addr)
        found[t[:4]] = t
    fadt = found[b"FACP"]
    facs_addr, dsdt_addr = struct.unpack_from("<II", fadt, 36)
    x_facs, x_dsdt = struct.unpack_from("<QQ", fadt, 132)
    assert (x_facs, x_dsdt) == (0, dsdt_addr)  # X_FIRMWARE_CTRL 0 when FIRMWARE_CTRL is set
    found[b"DSDT"] = table_at(blob, base, dsdt_addr)
    assert facs_addr % 64 == 0
    found[b"FACS"] = blob[facs_addr - base : facs_addr - base + 64]
    for sig, t in found.items():
        if sig != b"FACS":
            assert sum(t) % 256 == 0, f"{sig} checksum"
        assert t[:4] == sig
    return found


@pytest.mark.parametrize("name", PLANS)
def test_tables_reachable_and_checksummed(name):
    plan = PLANS[name]
    found = walk(plan)
    expected = {b"FACP", b"APIC", b"DSDT", b"FACS"}
    if len(plan.numa_nodes) > 1:
        expected |= {b"SRAT", b"SLIT"}
    assert set(found) == expected


@pytest.mark.parametrize("name", PLANS)
def test_madt(name):
    plan = PLANS[name]
    madt = walk(plan)[b"APIC"]
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == 0xFEE00000 and flags & 1
    cpus, ioapics, overrides, nmis = [], [], {}, []
    pos = 44
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        if kind == 0:
            _, _, uid, apic_id, fl = struct.unpack_from("<BBBBI", madt, pos)
            cpus.append((uid, apic_id, fl & 1))
        elif kind == 1:
            _, _, ioid, _, addr, gsi_base = struct.unpack_from("<BBBBII", madt, pos)
            ioapics.append((ioid, addr, gsi_base))
        elif kind == 2:
            _, _, bus, irq, gsi, fl = struct.unpack_from("<BBBBIH", madt, pos)
            overrides[irq] = (bus, gsi, fl)
        elif kind == 4:
            _, _, uid, fl, lint = struct.unpack_from("<BBBHB", madt, pos)
            nmis.append((uid, fl, lint))
        pos += length
    assert pos == len(madt)
    assert cpus == [(i, a, 1) for i, a in enumerate(plan.apic_ids)]
    assert ioapics == [(max(plan.apic_ids) + 1, 0xFEC00000, 0)]
    assert overrides == {0: (0, 2, 0), 9: (0, 9, 0xD)}
    assert nmis == [(0xFF, 0, 1)]


def test_fadt_reset_and_power_off():
    fadt = walk(PLANS["one-node"])[b"FACP"]
    assert fadt[8] == 6 and len(fadt) == 276  # revision 6
    (flags,) = struct.unpack_from("<I", fadt, 112)
    assert flags & (1 << 10), "RESET_REG_SUP"
    assert not flags & (1 << 20), "not HW_REDUCED_ACPI"
    space, width, _, _, addr = struct.unpack_from("<BBBBQ", fadt, 116)
    assert (space, width, addr, fadt[128]) == (1, 8, pm.RESET_PORT, pm.RESET_VALUE)
    (sci,) = struct.unpack_from("<H", fadt, 46)
    pm1a_evt, _, pm1a_cnt = struct.unpack_from("<III", fadt, 56)
    assert (sci, pm1a_evt, pm1a_cnt) == (9, 0x600, 0x604)
    assert fadt[88:90] == bytes([4, 2])  # PM1_EVT_LEN, PM1_CNT_LEN
    assert struct.unpack_from("<I", fadt, 48)[0] == 0  # no SMI_CMD: always ACPI mode


def test_fadt_pm_timer():
    """A 24-bit PM timer at pm.PM_TMR_PORT, in both the legacy and the extended field."""
    fadt = walk(PLANS["two-nodes"])[b"FACP"]
    (pm_tmr_blk,) = struct.unpack_from("<I", fadt, 76)
    assert (pm_tmr_blk, fadt[91]) == (pm.PM_TMR_PORT, 4) == (0x608, pm.PM_TMR_LEN)
    space, width, bit_offset, access, addr = struct.unpack_from("<BBBBQ", fadt, 208)
    assert (space, width, bit_offset, access, addr) == (1, 32, 0, 3, 0x608)  # I/O, dword
    (flags,) = struct.unpack_from("<I", fadt, 112)
    assert not flags & (1 << 8), "TMR_VAL_EXT: the timer counts 24 bits"
    assert pm.PM_TMR_MASK == (1 << 24) - 1 and pm.PM_TMR_FREQUENCY_HZ == 3_579_545
    # The blocks do not overlap: PM1a event, PM1a control, PM timer (as QEMU's PIIX4).
    blocks = sorted([(0x600, fadt[88]), (0x604, fadt[89]), (pm_tmr_blk, fadt[91])])
    assert all(a + n <= b for (a, n), (b, _) in zip(blocks, blocks[1:], strict=False))


def test_dsdt_s5_package_and_poweroff_value():
    dsdt = walk(PLANS["two-nodes"])[b"DSDT"]
    # Name (_S5_, Package (4) { S5, S5, Zero, Zero }) in AML, at the top of the block.
    s5 = bytes([0x08]) + b"_S5_" + bytes([0x12, 0x08, 0x04, 0x0A, 5, 0x0A, 5, 0x00, 0x00])
    assert pm.S5_SLP_TYP == 5
    assert dsdt[36 : 36 + len(s5)] == s5
    # What Linux writes to PM1a_CNT to power off, and what it writes before.
    value = pm.SCI_EN | pm.S5_SLP_TYP << 10 | 1 << 13
    assert pm.is_poweroff(pm.PM1A_CNT_PORT, value)
    assert not pm.is_poweroff(pm.PM1A_CNT_PORT, value & ~(1 << 13))
    assert not pm.is_poweroff(pm.PM1A_CNT_PORT, 1 << 10 | 1 << 13)
    assert pm.is_reset(0xCF9, 0x06) and not pm.is_reset(0xCF9, 0x02)


def test_srat_and_slit():
    plan = PLANS["odd-apic-ids"]
    found = walk(plan)
    srat, slit = found[b"SRAT"], found[b"SLIT"]
    cpus, mems = [], []
    pos = 48
    while pos < len(srat):
        kind, length = srat[pos], srat[pos + 1]
        if kind == 0:
            _, _, dom_lo, apic_id, fl, _, dom_hi = struct.unpack_from("<BBBBIB3s", srat, pos)
            cpus.append((apic_id, dom_lo | int.from_bytes(dom_hi, "little") << 8, fl & 1))
        elif kind == 1:
            _, _, dom, _, base, size, _, fl = struct.unpack_from("<BBIHQQII", srat, pos)
            mems.append((dom, base, size, fl & 1))
        pos += length
    assert cpus == [(4, 0, 1), (5, 0, 1), (9, 1, 1), (12, 2, 1)]
    assert sorted((b, s) for _, b, s, _ in mems) == sorted(
        r for n in plan.numa_nodes for r in n.mem_ranges
    )
    assert sum(s for _, _, s, _ in mems) == 5 * GiB
    assert struct.unpack_from("<Q", slit, 36)[0] == 3
    assert list(slit[44:53]) == [10, 20, 20, 20, 10, 20, 20, 20, 10]


def test_build_boot_tables_one_loop():
    plan = PLANS["two-nodes"]
    tables = build_boot_tables(plan)
    assert [a for a, _ in tables.regions] == [layout.MPTABLE_ADDR, layout.ACPI_TABLES_ADDR]
    assert tables.rsdp_addr == layout.ACPI_TABLES_ADDR
    mem = bytearray(layout.HIGH_MEMORY_START)
    for gpa, data in tables.regions:
        assert mem[gpa : gpa + len(data)] == bytes(len(data)), "regions do not overlap"
        mem[gpa : gpa + len(data)] = data
    assert mem[layout.MPTABLE_ADDR : layout.MPTABLE_ADDR + 4] == b"_MP_"
    assert mem[tables.rsdp_addr : tables.rsdp_addr + 8] == b"RSD PTR "
    # The legacy BIOS-area scan (0xe0000-0xfffff, 16-byte steps) finds the RSDP first.
    hits = [a for a in range(0xE0000, 0x100000, 16) if mem[a : a + 8] == b"RSD PTR "]
    assert hits == [tables.rsdp_addr]


@needs_iasl
@pytest.mark.parametrize("name", PLANS)
def test_iasl_disassembles_every_table(name, tmp_path):
    acpi = build_acpi(PLANS[name])
    for sig, (_, data) in acpi.tables.items():
        if sig == "RSDP":
            continue  # iasl reads only tables with a standard header from a file
        path = tmp_path / f"{sig.lower()}.dat"
        path.write_bytes(data)
        proc = subprocess.run(
            ["iasl", "-d", path.name], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        dsl = (tmp_path / f"{sig.lower()}.dsl").read_text()
        for text in (output, dsl):
            low = text.lower()
            assert "error" not in low and "warning" not in low, f"{sig}: {text}"
            assert "invalid" not in low and "****" not in text, f"{sig}: {text}"
        assert f'"{sig}"' in dsl
        if sig == "FACP":
            assert "PM Timer Block Address : 00000608" in dsl
            assert "PM Timer Block Length : 04" in dsl
            assert "32-bit PM Timer (V1) : 0" in dsl
            assert "RTC Century Index : 32" in dsl


@needs_iasl
def test_iasl_recompiles_the_dsdt(tmp_path):
    """The disassembled DSDT compiles back without errors or warnings (iasl -d then iasl)."""
    (_, data) = build_acpi(PLANS["odd-apic-ids"]).tables["DSDT"]
    (tmp_path / "dsdt.dat").write_bytes(data)
    subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, check=True)
    proc = subprocess.run(
        ["iasl", "-p", "again", "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 Errors, 0 Warnings" in proc.stdout, proc.stdout
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert "Device (C003)" in dsl and '"ACPI0007"' in dsl
    assert "Name (_S5, Package (0x04)" in dsl
