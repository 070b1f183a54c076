"""Guest memory: anonymous host mappings placed at guest-physical addresses.

One interface reaches guest memory: ``GuestMemory.read`` / ``write`` /
``view``, with a typed error (GuestMemoryError) for any address or range not
wholly inside one region. Regions never overlap. RAM above the 32-bit MMIO
hole is split as real firmware does (see ``layout.ram_regions``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from dataclasses import dataclass, field

from osvmm.arch.x86.layout import PAGE_SIZE
from osvmm.errors import EnforceError, GuestMemoryError
from osvmm.files import format_bytes

FILL_CHUNK = 1 << 20  # bytes written at a time by fill


@dataclass
class Region:
    """One contiguous guest-physical range backed by one host mapping."""

    gpa: int
    size: int
    mem: mmap.mmap = field(repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_addr(self) -> int:
        """The host virtual address of the mapping (for KVM memslots, mbind)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mem))

    def contains(self, gpa: int, size: int = 1) -> bool:
        return size >= 0 and self.gpa <= gpa and gpa + size <= self.end


class GuestMemory:
    """The guest-physical address space of one partition."""

    def __init__(self, ranges: list[tuple[int, int]]):
        """``ranges``: (guest-physical start, size) pairs, page aligned, disjoint."""
        self.regions: list[Region] = []
        for gpa, size in ranges:
            self.add_region(gpa, size)

    def add_region(self, gpa: int, size: int) -> Region:
        if size <= 0 or gpa < 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise GuestMemoryError(f"region {gpa:#x}+{size:#x} is not page aligned and non-empty")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise GuestMemoryError(
                    f"region {gpa:#x}+{size:#x} overlaps region {r.gpa:#x}+{r.size:#x}"
                )
        try:
            mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as e:
            if e.errno != errno.ENOMEM:
                raise
            self.close()  # the regions mapped so far
            raise EnforceError(
                f"the host cannot give that much guest memory: mmap of {format_bytes(size)} "
                f"at {gpa:#x} failed with ENOMEM (its free memory or overcommit limit)"
            ) from None
        region = Region(gpa, size, mem)
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        return region

    @property
    def size(self) -> int:
        """Total bytes of guest memory."""
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest guest-physical address backed by memory."""
        return max(r.end for r in self.regions)

    def region_of(self, gpa: int, size: int = 1) -> Region:
        for r in self.regions:
            if r.contains(gpa, size):
                return r
        raise GuestMemoryError(f"guest range {gpa:#x}+{size:#x} is not inside guest memory")

    def contains(self, gpa: int, size: int = 1) -> bool:
        return any(r.contains(gpa, size) for r in self.regions)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        r = self.region_of(gpa, len(data))
        off = gpa - r.gpa
        r.mem[off : off + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        r = self.region_of(gpa, size)
        off = gpa - r.gpa
        return r.mem[off : off + size]

    def view(self, gpa: int, size: int) -> memoryview:
        """A writable view of guest memory (no copy); must fit in one region."""
        r = self.region_of(gpa, size)
        off = gpa - r.gpa
        return memoryview(r.mem)[off : off + size]

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        """Set ``size`` bytes to ``byte``, a chunk at a time (``size`` may be gigabytes)."""
        r = self.region_of(gpa, size)
        off = gpa - r.gpa
        chunk = bytes([byte]) * min(size, FILL_CHUNK)
        for at in range(off, off + size, FILL_CHUNK):
            n = min(FILL_CHUNK, off + size - at)
            r.mem[at : at + n] = chunk[:n] if n < len(chunk) else chunk

    def close(self) -> None:
        for r in self.regions:
            r.mem.close()
        self.regions.clear()
