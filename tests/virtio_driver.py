"""A virtio driver's side, written in Python for the tests: guest memory laid out
by hand (descriptor tables, available and used rings, buffers), as a guest's
driver would, and read back as it would."""

from __future__ import annotations

import struct

from osvmm.devices.virtio import spec
from osvmm.vmm.memory import GuestMemory

MEM_SIZE = 1 << 20
DESC = 0x1000
AVAIL = 0x3000
USED = 0x4000
INDIRECT = 0x6000
DATA = 0x10000


def memory(size: int = MEM_SIZE) -> GuestMemory:
    mem = GuestMemory([])
    mem.add_region(0, size, "anonymous")
    return mem


class Driver:
    """One split queue of ``size`` entries at DESC/AVAIL/USED."""

    def __init__(self, mem: GuestMemory, size: int = 8, desc=DESC, avail=AVAIL, used=USED):
        self.mem, self.size = mem, size
        self.desc, self.avail, self.used = desc, avail, used
        self.avail_idx = 0
        self.used_seen = 0
        self.data_at = DATA

    def buffer(self, data: bytes | int) -> int:
        """Guest memory holding ``data`` (or that many zero bytes): its address."""
        raw = bytes(data) if isinstance(data, int) else data
        at = self.data_at
        self.mem.write(at, raw)
        self.data_at += (len(raw) + 15) & ~15 or 16
        return at

    def set_desc(
        self,
        index: int,
        addr: int,
        length: int,
        flags: int = 0,
        nxt: int = 0,
        table: int | None = None,
    ) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, segments, first: int = 0, table: int | None = None) -> int:
        """Descriptors ``first``.. for ``segments`` [(addr, len, writable)], linked."""
        for i, (addr, length, writable) in enumerate(segments):
            flags = spec.VIRTQ_DESC_F_WRITE if writable else 0
            last = i == len(segments) - 1
            if not last:
                flags |= spec.VIRTQ_DESC_F_NEXT
            self.set_desc(first + i, addr, length, flags, 0 if last else first + i + 1, table)
        return first

    def make_available(self, head: int) -> None:
        slot = self.avail + 4 + 2 * (self.avail_idx % self.size)
        self.mem.write(slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value))

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0]

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written) of each used entry since the last call."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            slot = self.used + 4 + 8 * (self.used_seen % self.size)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out
