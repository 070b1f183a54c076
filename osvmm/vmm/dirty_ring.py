"""KVM's dirty ring (KVM_CAP_DIRTY_LOG_RING): harvesting the pages the guest wrote.

With the ring enabled on a VM (before its vCPUs exist), KVM pushes one
``kvm_dirty_gfn`` (flags, slot, offset in pages) per page a vCPU writes into a
memslot with KVM_MEM_LOG_DIRTY_PAGES, into that vCPU's ring, mapped from the
vCPU fd at KVM_DIRTY_LOG_PAGE_OFFSET pages. The VMM harvests each ring from its
own fetch index: while the entry there has DIRTY set, it records (slot, offset)
and sets the flags to RESET; KVM_RESET_DIRTY_RINGS on the VM then lets KVM
reuse the reset entries. A vCPU whose ring is (softly) full exits with
KVM_EXIT_DIRTY_RING_FULL and must not run again before its ring is harvested
and reset (``DirtyRings.ring_full``, on the vCPU's thread).

``DirtyRing`` is one ring over any writable buffer (an mmap, or a bytearray in
the tests). ``DirtyRings`` is a VM's rings: harvests go into one set of
(slot, offset) under one lock, whether the migration collects
(``collect``) or a vCPU thread empties its full ring; the lock is held only
over harvesting and the reset ioctl, never while waiting on a vCPU, so
nothing deadlocks and no entry is lost between the two.
"""

from __future__ import annotations

import struct
import threading

from osvmm.kvm.structs import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET

ENTRY_SIZE = 16  # sizeof(struct kvm_dirty_gfn)
# The smallest ring KVM accepts: one page (256 entries; it keeps 64 or more in
# reserve, so the vCPU exits full after about 192 pages).
MIN_RING_BYTES = 4096
DEFAULT_RING_BYTES = 64 * 1024  # 4096 entries per vCPU (QEMU's default)
_FLAGS = struct.Struct("<I")
_GFN = struct.Struct("<IQ")  # slot, offset (after flags)
_SLOT_ID_MASK = 0xFFFF  # the low bits of ``slot``: the memslot; the high: its address space


def ring_bytes(offered: int, wanted: int) -> int:
    """The ring size to enable: ``wanted`` (a power of two) capped at what KVM
    offers (KVM_CHECK_EXTENSION); 0 when there is no ring of at least
    MIN_RING_BYTES to have."""
    if offered < MIN_RING_BYTES or wanted < ENTRY_SIZE or wanted & (wanted - 1):
        return 0
    size = min(wanted, offered)
    while size & (size - 1):  # offered is a power of two in practice; be safe
        size &= size - 1
    return size if size >= MIN_RING_BYTES else 0


def enable(vm, wanted: int) -> int:
    """Enable KVM's dirty ring on ``vm`` (no vCPU yet): ``wanted`` bytes per vCPU,
    capped at what KVM offers; returns the size, 0 where the host has no ring
    (the partition then uses the dirty bitmap)."""
    import errno

    from osvmm.errors import KvmError
    from osvmm.kvm.ioctls import KVM_CAP_DIRTY_LOG_RING

    offered = vm.check_extension(KVM_CAP_DIRTY_LOG_RING)
    size = ring_bytes(offered, wanted)
    # KVM keeps some entries in reserve, more where the CPU logs writes itself
    # (Intel's PML: 512 more): a ring smaller than that is refused (EINVAL), a
    # larger one then serves.
    while size and size <= offered:
        try:
            vm.enable_dirty_ring(size)
            return size
        except KvmError as err:
            if err.errno != errno.EINVAL:
                raise
        size *= 2
    return 0


class DirtyRing:
    """One vCPU's ring of ``len(buf) // 16`` entries and the VMM's fetch index."""

    def __init__(self, buf):
        self.buf = buf
        self.entries = len(buf) // ENTRY_SIZE
        self.fetch = 0  # the next entry to read, modulo ``entries``

    def harvest(self, out: set) -> int:
        """Add every dirty entry from the fetch index on to ``out`` as (slot, offset),
        mark each RESET, and return how many."""
        buf, n, fetch = self.buf, 0, self.fetch
        entries = self.entries
        while n < entries:
            off = fetch * ENTRY_SIZE
            if not _FLAGS.unpack_from(buf, off)[0] & KVM_DIRTY_GFN_F_DIRTY:
                break
            slot, offset = _GFN.unpack_from(buf, off + 4)
            out.add((slot & _SLOT_ID_MASK, offset))
            _FLAGS.pack_into(buf, off, KVM_DIRTY_GFN_F_RESET)
            fetch = (fetch + 1) % entries
            n += 1
        self.fetch = fetch
        return n


class DirtyRings:
    """A VM's dirty rings (one per vCPU), the entries harvested but not yet
    collected, and how often a vCPU's ring filled."""

    def __init__(self, vm, size: int):
        """``vm``: has ``reset_dirty_rings()``; ``size``: each ring's bytes."""
        self.vm = vm
        self.size = size
        self.rings: list[DirtyRing] = []
        self.full_exits = 0  # KVM_EXIT_DIRTY_RING_FULL handled
        self._pending: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def add(self, buf) -> DirtyRing:
        ring = DirtyRing(buf)
        self.rings.append(ring)
        return ring

    def _harvest(self) -> None:
        """Under the lock: every ring into the pending set, then the reset."""
        n = 0
        for ring in self.rings:
            n += ring.harvest(self._pending)
        if n:
            self.vm.reset_dirty_rings()

    def ring_full(self) -> None:
        """A vCPU exited with KVM_EXIT_DIRTY_RING_FULL (on its thread): empty the
        rings so it can run again."""
        with self._lock:
            self.full_exits += 1
            self._harvest()

    def collect(self) -> set[tuple[int, int]]:
        """Every (slot, offset) written since the last collect, and forget them."""
        with self._lock:
            self._harvest()
            pending, self._pending = self._pending, set()
        return pending
