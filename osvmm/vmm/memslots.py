"""Guest RAM as KVM memslots, with the pages the VMM must see written read-only.

A partition's RAM regions (vmm/memory.py) stay its backing; what KVM maps is
a set of memslots over them. Without protection each region is one slot.
``ram_layout(regions, readonly)`` splits the regions so that every page in
``readonly`` (page-aligned guest-physical ranges) lies in a slot with
KVM_MEM_READONLY: a guest write there exits to the VMM (KVM_EXIT_MMIO with the
address, size and data), reads and instruction fetches run at native speed,
and every other page stays in an ordinary writable slot. It is pure.

``Memslots`` owns one VM's slot numbers (``take``/``give``, lowest free first,
so numbers are reused and stay under KVM_CAP_NR_MEMSLOTS) and applies a new
RAM layout by replacing the slots of each region that changes. KVM cannot
resize a slot or toggle KVM_MEM_READONLY in place: a changed region's slots are
deleted and re-created, a window in which its memory is unmapped. The
partition therefore applies a layout before its vCPUs start, or with them
parked (Partition.protect_pages).
"""

from __future__ import annotations

from osvmm.arch.x86.layout import PAGE_SIZE
from osvmm.errors import GuestMemoryError
from osvmm.kvm.structs import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from osvmm.records import Frozen


class Slot(Frozen):
    """One memslot over a RAM region: guest-physical [gpa, gpa + size) at
    ``host_offset`` into the region's mapping."""

    gpa: int
    size: int
    host_offset: int
    readonly: bool


def normalize_pages(ranges) -> tuple[tuple[int, int], ...]:
    """Page-aligned ``(start, end)`` ranges, sorted, overlaps and neighbours merged."""
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if start % PAGE_SIZE or end % PAGE_SIZE or end <= start:
            raise GuestMemoryError(f"read-only range {start:#x}..{end:#x} is not whole pages")
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return tuple((s, e) for s, e in out)


def region_layout(gpa: int, size: int, readonly: tuple[tuple[int, int], ...]) -> tuple[Slot, ...]:
    """The slots of one region [gpa, gpa + size): alternating writable and read-only
    runs, in address order, covering it exactly (``readonly`` normalized)."""
    end = gpa + size
    slots: list[Slot] = []
    pos = gpa
    for start, stop in readonly:
        start, stop = max(start, gpa), min(stop, end)
        if start >= stop:
            continue
        if pos < start:
            slots.append(Slot(pos, start - pos, pos - gpa, False))
        slots.append(Slot(start, stop - start, start - gpa, True))
        pos = stop
    if pos < end:
        slots.append(Slot(pos, end - pos, pos - gpa, False))
    return tuple(slots)


def ram_layout(regions, readonly) -> dict[int, tuple[Slot, ...]]:
    """Region gpa -> its slots; ``regions``: objects with ``gpa`` and ``size``.
    Read-only pages outside every region are an error (they would map nothing)."""
    pages = normalize_pages(readonly)
    for start, stop in pages:
        covered = sum(max(0, min(stop, r.gpa + r.size) - max(start, r.gpa)) for r in regions)
        if covered != stop - start:
            raise GuestMemoryError(f"read-only range {start:#x}..{stop:#x} is not all guest RAM")
    return {r.gpa: region_layout(r.gpa, r.size, pages) for r in regions}


class Memslots:
    """The memslots of one VM: slot numbers, and the RAM layout currently mapped."""

    def __init__(self, vm, regions, limit: int = 0):
        """``regions``: the RAM regions (gpa, size, host_addr), already mapped as
        slots 0..n-1 by bringup.create_vm; ``limit``: KVM_CAP_NR_MEMSLOTS (0: unknown)."""
        self.vm = vm
        self.regions = list(regions)
        self.limit = limit
        self._used: set[int] = set(range(len(self.regions)))
        self._ram: dict[int, list[tuple[int, Slot]]] = {
            r.gpa: [(i, Slot(r.gpa, r.size, 0, False))] for i, r in enumerate(self.regions)
        }
        self.log_dirty = False  # KVM_MEM_LOG_DIRTY_PAGES on every RAM slot (a migration)
        self._reslotted: list[tuple[int, int]] = []  # regions re-slotted while logging
        # vmm/dirty_ring.py DirtyRings where the VM has KVM's dirty ring (then
        # KVM_GET_DIRTY_LOG is refused and the log is read from the rings).
        self.rings = None

    def _flags(self, slot: Slot) -> int:
        return (KVM_MEM_READONLY if slot.readonly else 0) | (
            KVM_MEM_LOG_DIRTY_PAGES if self.log_dirty else 0
        )

    def set_dirty_logging(self, on: bool) -> None:
        """Turn KVM's dirty log of guest RAM on or off (the slots stay in place: KVM
        lets a slot's LOG_DIRTY_PAGES flag change, unlike READONLY)."""
        self.log_dirty = on
        self._reslotted = []
        for region in self.regions:
            for n, slot in self._ram[region.gpa]:
                self.vm.set_user_memory_region(
                    n, slot.gpa, slot.size, region.host_addr + slot.host_offset, self._flags(slot)
                )
        if self.rings is not None:
            self.rings.collect()  # what a previous log left in the rings: not this one's

    def dirty_pages(self) -> list[int]:
        """The guest-physical pages the guest wrote since the last call (or since the
        log was turned on), and clear the log. A region re-slotted meanwhile lost its
        log: all its pages count as written."""
        pages: list[int] = []
        for gpa, size in self._reslotted:
            pages.extend(range(gpa, gpa + size, PAGE_SIZE))
        self._reslotted = []
        if self.rings is not None:
            return pages + self._ring_pages()
        for slots in self._ram.values():
            for n, slot in slots:
                bitmap = self.vm.get_dirty_log(n, slot.size // PAGE_SIZE)
                words = memoryview(bitmap).cast("Q")
                for w, word in enumerate(words):
                    while word:
                        low = word & -word
                        pages.append(slot.gpa + (w * 64 + low.bit_length() - 1) * PAGE_SIZE)
                        word ^= low
                words.release()
        return pages

    def _ring_pages(self) -> list[int]:
        """The pages in the dirty rings' (slot, offset) entries. An entry of a slot
        since deleted or re-made names no page or another of the same region, which
        was re-slotted and so counts whole anyway."""
        by_number = {n: slot for slots in self._ram.values() for n, slot in slots}
        pages = []
        for n, offset in self.rings.collect():
            slot = by_number.get(n)
            if slot is not None and offset * PAGE_SIZE < slot.size:
                pages.append(slot.gpa + offset * PAGE_SIZE)
        return pages

    def take(self) -> int:
        n = 0
        while n in self._used:
            n += 1
        if self.limit and n >= self.limit:
            raise GuestMemoryError(f"KVM allows {self.limit} memslots per VM and all are in use")
        self._used.add(n)
        return n

    def give(self, n: int) -> None:
        self._used.discard(n)

    @property
    def readonly(self) -> tuple[tuple[int, int], ...]:
        """The guest-physical ranges now mapped read-only."""
        return tuple(
            (s.gpa, s.gpa + s.size) for slots in self._ram.values() for _, s in slots if s.readonly
        )

    def set_readonly(self, ranges) -> int:
        """Map exactly ``ranges`` (whole pages of RAM) read-only, the rest writable;
        returns how many regions were re-slotted."""
        layout = ram_layout(self.regions, ranges)
        changed = [
            r for r in self.regions if tuple(s for _, s in self._ram[r.gpa]) != layout[r.gpa]
        ]
        need = len(self._used) + sum(len(layout[r.gpa]) - len(self._ram[r.gpa]) for r in changed)
        if self.limit and need > self.limit:
            raise GuestMemoryError(
                f"protecting these pages needs {need} memslots; KVM allows {self.limit}"
            )
        for region in changed:
            for n, old in self._ram[region.gpa]:
                self.vm.set_user_memory_region(n, old.gpa, 0, 0)  # size 0 deletes the slot
                self.give(n)
            self._ram[region.gpa] = []
            for slot in layout[region.gpa]:
                n = self.take()
                self.vm.set_user_memory_region(
                    n, slot.gpa, slot.size, region.host_addr + slot.host_offset, self._flags(slot)
                )
                self._ram[region.gpa].append((n, slot))
            if self.log_dirty:
                self._reslotted.append((region.gpa, region.size))
        return len(changed)
