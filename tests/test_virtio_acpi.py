"""How a partition's virtio-mmio devices are announced: one LNRO0005 device per
slot in the DSDT, with its page and its IRQ (iasl disassembles and recompiles
it); the e820 map and RAM stay clear of the device pages."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from osvmm.arch.x86 import irq, layout
from osvmm.boot.acpi.dsdt import build_dsdt
from osvmm.boot.e820 import e820_map
from osvmm.errors import ConfigError
from osvmm.machine import Machine

MiB = layout.MiB


def crs_resources(dsdt: bytes) -> list[tuple[int, int, int]]:
    """(base, length, irq) of every Memory32Fixed + Interrupt pair, found by their
    descriptor bytes (an independent reading of what aml.py wrote)."""
    out = []
    at = 0
    while (at := dsdt.find(b"\x86\x09\x00\x01", at)) >= 0:
        base, length = struct.unpack_from("<II", dsdt, at + 4)
        tag, size, flags, count, gsi = struct.unpack_from("<BHBBI", dsdt, at + 12)
        assert (tag, size, flags, count) == (0x89, 6, 0x03, 1)  # consumer, edge, high
        out.append((base, length, gsi))
        at += 12
    return out


def test_no_devices_no_entries():
    dsdt = build_dsdt(Machine.build(64 * MiB, 1))
    assert b"LNRO0005" not in dsdt and crs_resources(dsdt) == []


def test_each_slot_is_announced_with_its_page_and_irq():
    dsdt = build_dsdt(Machine.build(64 * MiB, 2, virtio_mmio=3))
    assert dsdt.count(b"LNRO0005") == 3
    assert crs_resources(dsdt) == [
        (0xC000_0000, 0x1000, 5),
        (0xC000_1000, 0x1000, 6),
        (0xC000_2000, 0x1000, 7),
    ]


@pytest.mark.parametrize("memory", [64 * MiB, 3 * layout.GiB, 5 * layout.GiB])
def test_device_pages_are_neither_ram_nor_in_the_e820_map(memory):
    machine = Machine.build(memory, 1, virtio_mmio=len(irq.VIRTIO_IRQS))
    first = layout.virtio_mmio_slot(0)[0]
    last = layout.virtio_mmio_slot(machine.virtio_mmio - 1)[0] + layout.VIRTIO_MMIO_SIZE
    for entry in e820_map(machine):
        assert entry.addr + entry.size <= first or entry.addr >= last, entry
    for start, size in machine.ram_ranges:
        assert start + size <= first or start >= last


def test_machine_refuses_too_many_devices_and_reserved_ranges_over_them():
    with pytest.raises(ConfigError, match="at most 7"):
        Machine.build(64 * MiB, 1, virtio_mmio=8)
    with pytest.raises(ConfigError, match="virtio-mmio devices"):
        Machine(64 * MiB, [0], reserved=((0xC000_0000, 0x1000),))


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl is not installed (acpica-tools)")
def test_iasl_reads_and_recompiles_the_devices(tmp_path):
    (tmp_path / "dsdt.dat").write_bytes(build_dsdt(Machine.build(64 * MiB, 1, virtio_mmio=2)))
    subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, check=True)
    dsl = (tmp_path / "dsdt.dsl").read_text()
    proc = subprocess.run(
        ["iasl", "-p", "again", "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "0 Errors, 0 Warnings" in proc.stdout, proc.stdout
    for text in ("Device (VR00)", "Device (VR01)", 'Name (_HID, "LNRO0005")', "Name (_UID, One)"):
        assert text in dsl, dsl
    assert dsl.count("Memory32Fixed (ReadWrite,") == 2
    assert "0xC0001000," in dsl
    assert dsl.count("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive") == 2
    assert "0x00000006," in dsl
