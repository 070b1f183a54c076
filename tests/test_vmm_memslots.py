"""Guest RAM as memslots with read-only pages (osvmm/vmm/memslots.py): the pure
layout, the slot numbers, and the calls made to KVM (a recording fake VM)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from osvmm.errors import GuestMemoryError
from osvmm.kvm.structs import KVM_MEM_READONLY
from osvmm.vmm.memslots import Memslots, Slot, normalize_pages, ram_layout, region_layout

P = 4096


@dataclass
class Region:
    gpa: int
    size: int
    host_addr: int = 0x7F00_0000_0000


class FakeVm:
    def __init__(self):
        self.calls = []
        self.slots = {}

    def set_user_memory_region(self, slot, gpa, size, host_addr, flags=0):
        self.calls.append((slot, gpa, size, host_addr, flags))
        if size == 0:
            assert slot in self.slots, f"deleting slot {slot} that is not mapped"
            del self.slots[slot]
        else:
            if slot in self.slots and self.slots[slot][:3] == (gpa, size, host_addr):
                self.slots[slot] = (gpa, size, host_addr, flags)  # KVM changes flags in place
                return
            assert slot not in self.slots, f"slot {slot} is mapped already"
            for s, (g, z, _, _) in self.slots.items():
                assert gpa + size <= g or g + z <= gpa, f"slot {slot} overlaps slot {s}"
            self.slots[slot] = (gpa, size, host_addr, flags)


def test_no_readonly_page_is_one_writable_slot():
    assert region_layout(0, 64 * P, ()) == (Slot(0, 64 * P, 0, False),)


def test_a_page_in_the_middle_splits_the_region_in_three():
    assert region_layout(0x100000, 16 * P, ((0x104000, 0x105000),)) == (
        Slot(0x100000, 4 * P, 0, False),
        Slot(0x104000, P, 4 * P, True),
        Slot(0x105000, 11 * P, 5 * P, False),
    )


def test_readonly_at_the_edges_and_clipped_to_the_region():
    assert region_layout(P, 4 * P, ((0, 2 * P), (4 * P, 9 * P))) == (
        Slot(P, P, 0, True),
        Slot(2 * P, 2 * P, P, False),
        Slot(4 * P, P, 3 * P, True),
    )


def test_ranges_are_sorted_and_merged_and_must_be_whole_pages():
    assert normalize_pages([(3 * P, 4 * P), (0, P), (P, 2 * P), (3 * P, 5 * P)]) == (
        (0, 2 * P),
        (3 * P, 5 * P),
    )
    with pytest.raises(GuestMemoryError, match="not whole pages"):
        normalize_pages([(0, 100)])
    with pytest.raises(GuestMemoryError, match="not all guest RAM"):
        ram_layout([Region(0, 4 * P)], [(3 * P, 5 * P)])


@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8)), max_size=6),
    st.sampled_from([(0, 16), (2, 30), (5, 1)]),
)
def test_layout_covers_each_region_exactly_and_readonly_just_where_asked(pages, region):
    gpa, size = region[0] * P, region[1] * P
    ranges = [(s * P, (s + n) * P) for s, n in pages]
    slots = region_layout(gpa, size, normalize_pages(ranges))
    pos = gpa
    for slot in slots:
        assert slot.gpa == pos and slot.size > 0 and slot.host_offset == pos - gpa
        pos += slot.size
        for page in range(slot.gpa, slot.gpa + slot.size, P):
            wanted = any(s <= page < e for s, e in ranges)
            assert slot.readonly == wanted
    assert pos == gpa + size
    # neighbours differ (no two writable or two read-only slots side by side)
    assert all(a.readonly != b.readonly for a, b in zip(slots, slots[1:], strict=False))


def test_memslots_reslot_only_the_changed_region_and_reuse_numbers():
    vm = FakeVm()
    regions = [Region(0, 16 * P, 0x1000_0000), Region(0x100000, 16 * P, 0x2000_0000)]
    for i, r in enumerate(regions):  # as bringup.create_vm maps them
        vm.set_user_memory_region(i, r.gpa, r.size, r.host_addr)
    vm.calls.clear()
    slots = Memslots(vm, regions, limit=8)
    assert slots.set_readonly([(0x102000, 0x103000)]) == 1
    assert vm.calls[0] == (1, 0x100000, 0, 0, 0)  # region 1's slot deleted first
    assert sorted(v for v in vm.slots.values()) == [
        (0, 16 * P, 0x1000_0000, 0),
        (0x100000, 2 * P, 0x2000_0000, 0),
        (0x102000, P, 0x2000_0000 + 2 * P, KVM_MEM_READONLY),
        (0x103000, 13 * P, 0x2000_0000 + 3 * P, 0),
    ]
    assert set(vm.slots) == {0, 1, 2, 3}
    assert slots.readonly == ((0x102000, 0x103000),)
    vm.calls.clear()
    assert slots.set_readonly([(0x102000, 0x103000)]) == 0 and vm.calls == []
    assert slots.set_readonly([]) == 1
    assert sorted(vm.slots.values()) == [
        (0, 16 * P, 0x1000_0000, 0),
        (0x100000, 16 * P, 0x2000_0000, 0),
    ]
    assert slots.readonly == ()


def test_memslots_refuse_a_layout_over_the_kvm_limit_before_touching_kvm():
    vm = FakeVm()
    vm.set_user_memory_region(0, 0, 64 * P, 0)
    vm.calls.clear()
    slots = Memslots(vm, [Region(0, 64 * P)], limit=4)
    with pytest.raises(GuestMemoryError, match="needs 5 memslots; KVM allows 4"):
        slots.set_readonly([(2 * P, 3 * P), (5 * P, 6 * P)])
    assert vm.calls == []
    assert slots.take() == 1 and slots.take() == 2
    slots.give(1)
    assert slots.take() == 1


class FakeRings:
    """vmm/dirty_ring.py DirtyRings' ``collect``: (slot, offset) entries, given."""

    def __init__(self):
        self.entries: set = set()

    def collect(self):
        out, self.entries = self.entries, set()
        return out


def test_dirty_pages_from_the_dirty_ring_map_slot_and_offset_to_addresses():
    vm = FakeVm()
    regions = [Region(0, 16 * P, 0x1000_0000), Region(0x100000, 16 * P, 0x2000_0000)]
    for i, r in enumerate(regions):
        vm.set_user_memory_region(i, r.gpa, r.size, r.host_addr)
    slots = Memslots(vm, regions, limit=8)
    slots.rings = rings = FakeRings()
    rings.entries = {(0, 99)}  # left from before the log: dropped when it is turned on
    slots.set_dirty_logging(True)
    rings.entries = {(0, 3), (1, 0), (1, 15), (7, 1), (1, 16)}  # slot 7: none; 16: past the end
    assert sorted(slots.dirty_pages()) == [3 * P, 0x100000, 0x100000 + 15 * P]
    assert slots.dirty_pages() == []
    # A region re-slotted while logging counts whole; its new slots' entries map too.
    slots.set_readonly([(0x102000, 0x103000)])
    rings.entries = {(2, 0)}  # the new slot 2 starts at 0x102000
    pages = slots.dirty_pages()
    assert set(range(0x100000, 0x110000, P)) <= set(pages) and 0x102000 in pages
