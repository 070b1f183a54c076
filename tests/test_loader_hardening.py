"""Loaders against small hostile images: linear time, bounded memory, honest messages."""

from __future__ import annotations

import tracemalloc

import pytest

from osvmm.boot.image import NO_QUIRKS, BootSource, StagedMemory, ZeroFill
from osvmm.boot.prepare import prepare
from osvmm.errors import GuestMemoryError, ImageError
from osvmm.loader.elf import load_elf
from osvmm.machine import Machine
from osvmm.vmm.memory import GuestMemory
from tests.test_inputs_bounded import within
from tests.test_loader_elf import elf

MiB = 1 << 20


def test_twenty_thousand_segments_load_in_linear_time():
    segs = [{"paddr": 0x100000 + i * 16, "data": b"\x90" * 8} for i in range(20_000)]
    data = elf(segments=segs)
    machine = Machine.build(64 * MiB, 1)
    with within(2):
        img = load_elf(data, StagedMemory(machine.ram_ranges))
    assert (img.start, img.end) == (0x100000, 0x100000 + 19_999 * 16 + 8)


def test_overlap_found_among_many_segments():
    segs = [{"paddr": 0x100000 + i * 16, "data": b"\x90" * 8} for i in range(5000)]
    segs.append({"paddr": 0x100000 + 2500 * 16 + 4, "data": b"\x90" * 4})
    with within(2), pytest.raises(ImageError, match="overlap"):
        load_elf(elf(segments=segs), StagedMemory(Machine.build(64 * MiB, 1).ram_ranges))


def test_a_large_bss_is_staged_by_its_size():
    # 200 bytes of file, 256 MiB of .bss: preparing the boot must not hold 256 MiB.
    seg = {"paddr": 0x100000, "data": b"\xf4" * 16, "memsz": 256 * MiB}
    data = elf(segments=[seg])
    tracemalloc.start()
    try:
        boot = prepare(BootSource("bss", data, False), Machine.build(512 * MiB, 1), "", NO_QUIRKS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * MiB, peak
    assert (0x100010, ZeroFill(256 * MiB - 16)) in boot.writes


def test_zero_fill_clears_guest_memory():
    mem = GuestMemory([(0, 8 * MiB)])
    try:
        mem.write(0x100000, b"\xaa" * (3 * MiB))
        staged = StagedMemory(((0, 8 * MiB),))
        staged.fill(0x100010, 3 * MiB - 32)
        for gpa, chunk in staged.writes:
            assert isinstance(chunk, ZeroFill)
            mem.fill(gpa, chunk.size)
        assert mem.read(0x100000, 16) == b"\xaa" * 16
        assert mem.read(0x100010, 3 * MiB - 32) == bytes(3 * MiB - 32)
        assert mem.read(0x100000 + 3 * MiB - 16, 16) == b"\xaa" * 16
    finally:
        mem.close()


def test_staged_zero_fill_is_checked_against_ram():
    staged = StagedMemory(((0, 8 * MiB),))
    with pytest.raises(GuestMemoryError):
        staged.fill(7 * MiB, 2 * MiB)
