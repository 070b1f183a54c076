"""The split virtqueue (virtio 1.2 section 2.7) over guest memory.

Everything here is read from memory the guest controls, so every value is
checked before it is used:

- the rings must lie in guest RAM, aligned as 2.7 asks (descriptor table 16,
  available ring 2, used ring 4) and the size must be a power of two;
- the driver may not move ``avail->idx`` more than the queue size ahead of
  what the device has taken;
- a chain is a descriptor index below the queue size, followed through
  ``next`` at most queue-size descriptors (a loop ends there), with at most
  one indirect table (VIRTIO_F_INDIRECT_DESC negotiated, not chained on, no
  nested indirection, a whole number of descriptors up to 32768, in RAM,
  followed at most its own length), every
  buffer in guest RAM, and no device-readable buffer after a device-writable
  one (2.7.4.2).

Any violation raises ``QueueError``; the transport then marks the device
DEVICE_NEEDS_RESET and stops serving it (mmio.py). Nothing here loops longer
than the queue size or touches memory outside guest RAM: ``memory`` refuses
any other range (GuestMemoryError), and those are caught as QueueError too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from osvmm.devices.virtio import spec
from osvmm.errors import GuestMemoryError

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class QueueError(Exception):
    """The driver broke the virtqueue's rules (the message says which)."""


@dataclass
class Chain:
    """One descriptor chain taken from the available ring: its head index and its
    buffers, device-readable ones first, as (guest-physical address, length)."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    @staticmethod
    def _pieces(buffers, start: int, length: int):
        """(address, length) pieces of bytes [start, start + length) of ``buffers``."""
        for addr, n in buffers:
            if length <= 0:
                return
            if start >= n:
                start -= n
                continue
            take = min(n - start, length)
            yield addr + start, take
            length -= take
            start = 0

    def readable_views(self, memory, start: int, length: int) -> list[memoryview]:
        """Views of bytes [start, start + length) of the device-readable buffers."""
        return [memory.view(a, n) for a, n in self._pieces(self.readable, start, length)]

    def writable_views(self, memory, start: int, length: int) -> list[memoryview]:
        return [memory.view(a, n) for a, n in self._pieces(self.writable, start, length)]

    def read(self, memory, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the device-readable buffers (fewer when
        the chain is shorter)."""
        return b"".join(memory.read(a, n) for a, n in self._pieces(self.readable, start, length))

    def write(self, memory, start: int, data: bytes) -> int:
        """Write ``data`` into the device-writable buffers at ``start``; returns the
        bytes written (fewer when the buffers are shorter)."""
        done = 0
        for a, n in self._pieces(self.writable, start, len(data)):
            memory.write(a, data[done : done + n])
            done += n
        return done


class Virtqueue:
    """One split virtqueue: descriptor table, available ring and used ring."""

    def __init__(
        self,
        memory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        indirect: bool = False,
        event_idx: bool = False,
    ):
        if size < 1 or size > spec.VIRTQ_MAX_SIZE or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two up to 32768")
        parts = (
            ("descriptor table", desc, spec.VIRTQ_DESC_SIZE * size, 16),
            ("available ring", avail, 6 + 2 * size, 2),
            ("used ring", used, 6 + 8 * size, 4),
        )
        for what, addr, length, align in parts:
            if addr % align:
                raise QueueError(f"{what} at {addr:#x} is not {align}-byte aligned")
            if not memory.contains(addr, length):
                raise QueueError(f"{what} {addr:#x}+{length:#x} is not in guest RAM")
        self.memory = memory
        self.size = size
        self.desc, self.avail, self.used = desc, avail, used
        self.indirect = indirect
        self.event_idx = event_idx
        self.last_avail = 0  # the next available-ring entry the device takes
        self.used_idx = 0  # the device's copy of used->idx
        self.signalled_used = 0  # used->idx when the driver was last interrupted (event idx)

    # -- the available ring ------------------------------------------------------------
    def _u16(self, addr: int) -> int:
        return _U16.unpack(self.memory.read(addr, 2))[0]

    def pending(self) -> int:
        """Chains the driver made available that the device has not taken."""
        n = (self._u16(self.avail + 2) - self.last_avail) & 0xFFFF
        if n > self.size:
            raise QueueError(
                f"available index moved {n} entries ahead of the device, "
                f"more than the queue size {self.size}"
            )
        return n

    def pop(self) -> Chain | None:
        """The next available chain, or None. With event idx, an empty ring first
        tells the driver where to notify (avail_event) and is looked at once more,
        so that a chain made available meanwhile is not left waiting."""
        try:
            if not self.pending():
                if not self.event_idx:
                    return None
                self.memory.write(self.used + 4 + 8 * self.size, _U16.pack(self.last_avail))
                if not self.pending():
                    return None
            slot = self.avail + 4 + 2 * (self.last_avail % self.size)
            head = self._u16(slot)
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            return self._walk(head)
        except GuestMemoryError as err:
            raise QueueError(str(err)) from None

    def _walk(self, head: int) -> Chain:
        if head >= self.size:
            raise QueueError(f"chain head {head} is outside a queue of {self.size}")
        chain = Chain(head)
        table, table_size = self.desc, self.size
        index = head
        seen = 0
        in_indirect = False
        while True:
            seen += 1
            if seen > table_size:
                raise QueueError(
                    f"chain at {head} is longer than its table of {table_size} (a loop?)"
                )
            addr, length, flags, nxt = _DESC.unpack(
                self.memory.read(table + spec.VIRTQ_DESC_SIZE * index, spec.VIRTQ_DESC_SIZE)
            )
            if flags & spec.VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise QueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_indirect:
                    raise QueueError("indirect descriptor inside an indirect table")
                if flags & spec.VIRTQ_DESC_F_NEXT:
                    raise QueueError("indirect descriptor with VIRTQ_DESC_F_NEXT")
                if length == 0 or length % spec.VIRTQ_DESC_SIZE:
                    raise QueueError(f"indirect table of {length} bytes")
                if not self.memory.contains(addr, length):
                    raise QueueError(f"indirect table {addr:#x}+{length:#x} is not in guest RAM")
                if addr % spec.VIRTQ_DESC_SIZE:
                    raise QueueError(f"indirect table at {addr:#x} is not 16-byte aligned")
                if length // spec.VIRTQ_DESC_SIZE > spec.VIRTQ_MAX_SIZE:
                    raise QueueError(f"indirect table of {length // 16} descriptors")
                table, table_size = addr, length // spec.VIRTQ_DESC_SIZE
                index, in_indirect, seen = 0, True, 0
                continue
            if length and not self.memory.contains(addr, length):
                raise QueueError(f"buffer {addr:#x}+{length:#x} is not in guest RAM")
            if flags & spec.VIRTQ_DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise QueueError("a device-readable buffer after a device-writable one")
            else:
                chain.readable.append((addr, length))
            if not flags & spec.VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= table_size:
                raise QueueError(f"next descriptor {nxt} is outside a table of {table_size}")
            index = nxt

    def indices(self) -> dict:
        """Where the queue stands, for ``osvmm stat``: the driver's available index
        and the device's, the used index and where it was last signalled, and with
        event idx the two events (``used_event``: the driver wants an interrupt once
        used passes it; ``avail_event``: the device wants a notify once avail does).
        A ring no longer readable (a driver that moved it) reads as None."""
        out = {
            "size": self.size,
            "avail_idx": None,
            "last_avail": self.last_avail,
            "used_idx": self.used_idx,
            "signalled_used": self.signalled_used,
        }
        try:
            out["avail_idx"] = self._u16(self.avail + 2)
            if self.event_idx:
                out["used_event"] = self._u16(self.avail + 4 + 2 * self.size)
                out["avail_event"] = self._u16(self.used + 4 + 8 * self.size)
        except GuestMemoryError:
            pass
        return out

    # -- a snapshot's part (vmm/snapshot.py) ----------------------------------------------
    def state(self) -> dict:
        """The device's own indices, which are not in guest memory: the next
        available entry it takes, its used index, and where the driver was last
        interrupted (event idx). The rest of the queue is in guest memory."""
        return {
            "last_avail": self.last_avail,
            "used_idx": self.used_idx,
            "signalled_used": self.signalled_used,
        }

    def restore(self, st: dict) -> None:
        """Take ``state()`` back (ValueError for indices that are not 16-bit)."""
        values = [st["last_avail"], st["used_idx"], st["signalled_used"]]
        if not all(isinstance(v, int) and 0 <= v <= 0xFFFF for v in values):
            raise ValueError(f"virtqueue indices {values} are not 16-bit")
        self.last_avail, self.used_idx, self.signalled_used = values

    # -- the used ring -----------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written into it."""
        try:
            slot = self.used + 4 + 8 * (self.used_idx % self.size)
            self.memory.write(slot, _USED_ELEM.pack(head, written))
            self.used_idx = (self.used_idx + 1) & 0xFFFF
            self.memory.write(self.used + 2, _U16.pack(self.used_idx))  # after the entry
        except GuestMemoryError as err:
            raise QueueError(str(err)) from None

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last
        one: used_event (2.7.10) with event idx, else unless it set
        VIRTQ_AVAIL_F_NO_INTERRUPT. Call once after a batch of pushes."""
        new, old = self.used_idx, self.signalled_used
        if new == old:
            return False
        self.signalled_used = new
        try:
            if self.event_idx:
                used_event = self._u16(self.avail + 4 + 2 * self.size)
                return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
            return not self._u16(self.avail) & spec.VIRTQ_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as err:
            raise QueueError(str(err)) from None
