"""The dirty ring's harvesting (vmm/dirty_ring.py) on a fake ring: a bytearray
laid out as KVM lays out a vCPU's ring of kvm_dirty_gfn entries."""

from __future__ import annotations

import struct
import threading

from osvmm.kvm.structs import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, kvm_dirty_gfn
from osvmm.vmm.dirty_ring import (
    DEFAULT_RING_BYTES,
    MIN_RING_BYTES,
    DirtyRing,
    DirtyRings,
    ring_bytes,
)

ENTRIES = 8


def push(buf: bytearray, index: int, slot: int, offset: int) -> None:
    """What KVM does: fill entry ``index`` (modulo the ring) and mark it DIRTY."""
    e = kvm_dirty_gfn(flags=KVM_DIRTY_GFN_F_DIRTY, slot=slot, offset=offset)
    n = len(buf) // 16
    buf[(index % n) * 16 : (index % n) * 16 + 16] = bytes(e)


def flags(buf: bytearray, index: int) -> int:
    return struct.unpack_from("<I", buf, index * 16)[0]


def test_harvest_reads_the_dirty_entries_and_marks_them_reset():
    buf = bytearray(ENTRIES * 16)
    push(buf, 0, 1, 5)
    push(buf, 1, 0, 0x1234)
    ring = DirtyRing(buf)
    out: set = set()
    assert ring.harvest(out) == 2
    assert out == {(1, 5), (0, 0x1234)}
    assert flags(buf, 0) == KVM_DIRTY_GFN_F_RESET and flags(buf, 1) == KVM_DIRTY_GFN_F_RESET
    assert flags(buf, 2) == 0
    assert ring.fetch == 2


def test_harvest_stops_at_an_entry_kvm_has_not_pushed_and_keeps_its_index():
    buf = bytearray(ENTRIES * 16)
    ring = DirtyRing(buf)
    assert ring.harvest(set()) == 0 and ring.fetch == 0
    push(buf, 0, 0, 1)
    assert ring.harvest(set()) == 1
    # A reset entry (not yet reused by KVM) is not dirty: nothing more.
    assert ring.harvest(set()) == 0 and ring.fetch == 1
    push(buf, 1, 0, 2)
    out: set = set()
    assert ring.harvest(out) == 1 and out == {(0, 2)} and ring.fetch == 2


def test_harvest_wraps_around_the_ring():
    buf = bytearray(ENTRIES * 16)
    ring = DirtyRing(buf)
    for i in range(6):
        push(buf, i, 0, i)
    assert ring.harvest(set()) == 6
    for i in range(6, 6 + ENTRIES):  # KVM reused the reset entries: 6, 7, 0, 1, ...
        push(buf, i, 0, i)
    out: set = set()
    assert ring.harvest(out) == ENTRIES
    assert out == {(0, i) for i in range(6, 6 + ENTRIES)}
    assert ring.fetch == (6 + ENTRIES) % ENTRIES


def test_a_ring_all_dirty_is_read_once_not_forever():
    buf = bytearray(ENTRIES * 16)
    for i in range(ENTRIES):
        push(buf, i, 0, i)
    ring = DirtyRing(buf)
    assert ring.harvest(set()) == ENTRIES
    assert ring.harvest(set()) == 0


def test_the_address_space_bits_of_slot_are_dropped():
    buf = bytearray(ENTRIES * 16)
    push(buf, 0, (1 << 16) | 3, 9)
    out: set = set()
    DirtyRing(buf).harvest(out)
    assert out == {(3, 9)}


class FakeVm:
    def __init__(self):
        self.resets = 0

    def reset_dirty_rings(self) -> None:
        self.resets += 1


def test_rings_collect_every_vcpu_and_reset_only_when_something_was_harvested():
    vm = FakeVm()
    rings = DirtyRings(vm, ENTRIES * 16)
    a, b = bytearray(ENTRIES * 16), bytearray(ENTRIES * 16)
    rings.add(a), rings.add(b)
    assert rings.collect() == set() and vm.resets == 0
    push(a, 0, 0, 1)
    push(b, 0, 0, 2)
    push(b, 1, 0, 1)
    assert rings.collect() == {(0, 1), (0, 2)} and vm.resets == 1
    assert rings.collect() == set()


def test_a_full_ring_harvested_by_the_vcpu_thread_reaches_the_next_collect():
    vm = FakeVm()
    rings = DirtyRings(vm, ENTRIES * 16)
    buf = bytearray(ENTRIES * 16)
    rings.add(buf)
    for i in range(ENTRIES):
        push(buf, i, 0, i)
    t = threading.Thread(target=rings.ring_full)
    t.start()
    t.join()
    assert rings.full_exits == 1 and vm.resets == 1
    assert all(flags(buf, i) == KVM_DIRTY_GFN_F_RESET for i in range(ENTRIES))
    push(buf, ENTRIES, 0, 100)
    assert rings.collect() == {(0, i) for i in range(ENTRIES)} | {(0, 100)}


def test_ring_bytes_is_a_power_of_two_within_what_kvm_offers():
    assert ring_bytes(0, DEFAULT_RING_BYTES) == 0  # no ring on this host
    assert ring_bytes(1 << 20, DEFAULT_RING_BYTES) == DEFAULT_RING_BYTES
    assert ring_bytes(16384, DEFAULT_RING_BYTES) == 16384
    assert ring_bytes(1 << 20, MIN_RING_BYTES) == MIN_RING_BYTES
    assert ring_bytes(1 << 20, 3000) == 0  # not a power of two
    assert ring_bytes(1 << 20, 2048) == 0  # under the minimum


def test_osvmm_up_asks_for_the_default_ring_or_the_one_osvmm_dirty_ring_names(monkeypatch):
    import pytest

    from osvmm.errors import ConfigError
    from osvmm.up.partition_config import dirty_ring_setting

    monkeypatch.delenv("OSVMM_DIRTY_RING", raising=False)
    assert dirty_ring_setting() == DEFAULT_RING_BYTES
    monkeypatch.setenv("OSVMM_DIRTY_RING", "0")
    assert dirty_ring_setting() == 0
    monkeypatch.setenv("OSVMM_DIRTY_RING", "4096")
    assert dirty_ring_setting() == 4096
    for bad in ("3000", "2048", "lots"):
        monkeypatch.setenv("OSVMM_DIRTY_RING", bad)
        with pytest.raises(ConfigError, match="OSVMM_DIRTY_RING"):
            dirty_ring_setting()


def test_osvmm_run_asks_for_no_ring():
    from osvmm.vmm.partition import PartitionConfig

    assert PartitionConfig._defaults["dirty_ring"] == 0  # cli.py sets none


class CapVm:
    """A VM whose KVM offers ``offered`` bytes and refuses rings under ``least``."""

    def __init__(self, offered: int, least: int):
        self.offered, self.least, self.tried, self.dirty_ring_size = offered, least, [], 0

    def check_extension(self, cap):
        return self.offered

    def enable_dirty_ring(self, size):
        import errno

        from osvmm.errors import KvmError

        self.tried.append(size)
        if size < self.least:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP")
        self.dirty_ring_size = size


def test_enable_takes_the_next_size_kvm_accepts_or_none():
    from osvmm.vmm.dirty_ring import enable

    vm = CapVm(1 << 20, 4096)
    assert enable(vm, 4096) == 4096 and vm.tried == [4096]
    vm = CapVm(1 << 20, 9216)  # Intel with PML: 64 + 512 entries in reserve
    assert enable(vm, 4096) == 16384 and vm.tried == [4096, 8192, 16384]
    vm = CapVm(0, 4096)  # no ring on this host: the bitmap
    assert enable(vm, DEFAULT_RING_BYTES) == 0 and vm.tried == []
    vm = CapVm(8192, 1 << 20)  # nothing it offers is accepted
    assert enable(vm, 4096) == 0 and vm.dirty_ring_size == 0
