"""Guest memory: host mappings placed at guest-physical addresses.

One interface reaches guest memory: ``GuestMemory.read`` / ``write`` /
``view``, with a typed error (GuestMemoryError) for any address or range not
wholly inside one region. Regions never overlap. RAM above the 32-bit MMIO
hole is split as real firmware does (see ``layout.ram_regions``).

What backs a region (``Region.backing``):

- ``memfd`` (the default): a memfd mapped shared. Its file descriptor
  (``Region.fd``) lets another process map the very same memory (a VMM that
  takes over a partition), and the kernel tracks which pages were ever
  touched (SEEK_DATA/SEEK_HOLE: a snapshot skips the rest without reading it).
- ``anonymous``: a private anonymous mapping, for the one case memfd memory
  loses something: huge pages wanted where the host gives transparent huge
  pages to anonymous memory but not to shared memory (shmem_enabled
  ``never``); the partition chooses (vmm/partition.py).
- ``file``: a snapshot's memory file mapped private (copy-on-write): pages
  are read from the file when the guest first touches them, and a guest
  write copies the page; the file is never written (vmm/snapshot.py).

A region (any backing) may be placed at an address range reserved ahead (``reserve``): a VM
made ready before its partition (vmm/ready.py) registers its memslots on the
reservations, and the region is mapped over one later (MAP_FIXED), at the
same host address, so the memslot needs no new registration. KVM follows the
change through its MMU notifier, as for any mapping under a memslot.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from osvmm.arch.x86.layout import PAGE_SIZE
from osvmm.errors import EnforceError, GuestMemoryError
from osvmm.files import format_bytes
from osvmm.records import Record

FILL_CHUNK = 1 << 20  # bytes written at a time by fill

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p
MAP_FIXED = 0x10  # <sys/mman.h>; Python 3.11's mmap module names neither
MAP_NORESERVE = 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value


def reserve(size: int) -> mmap.mmap:
    """``size`` bytes of address space for a region to come: private anonymous
    memory that is never touched and not counted against the overcommit limit
    (MAP_NORESERVE); ``GuestMemory.add_file_region(..., reserved=)`` maps over it."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)


def _map_over(mem: mmap.mmap, fd: int, offset: int, flags: int) -> None:
    """Map ``fd`` from ``offset`` (``flags``: MAP_PRIVATE or MAP_SHARED, and
    MAP_ANONYMOUS with fd -1) over the whole of ``mem``, a reservation: MAP_FIXED,
    its address range now holds the new mapping. An OSError on failure."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    ret = _libc.mmap(
        addr, len(mem), mmap.PROT_READ | mmap.PROT_WRITE, flags | MAP_FIXED, fd, offset
    )
    if ret == MAP_FAILED or ret != addr:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Region(Record):
    """One contiguous guest-physical range backed by one host mapping."""

    gpa: int
    size: int
    mem: mmap.mmap
    backing: str = "anonymous"  # "memfd", "anonymous" or "file" (above)
    fd: int | None = None  # the memfd or the snapshot file (owned: closed with the region)
    fd_offset: int = 0  # where the region starts in ``fd``
    # Its fd was passed to another process (a takeover, vmm/migration.py): its pages
    # are no longer this VMM's alone, and ``zero`` refuses them.
    shared_out: bool = False

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

    def __init__(self, ranges: list[tuple[int, int]], backing: str = "memfd"):
        """``ranges``: (guest-physical start, size) pairs, page aligned, disjoint."""
        self.regions: list[Region] = []
        # While a migration tracks dirty memory: the pages ``write`` wrote (the VMM's own
        # writes, which KVM's dirty log does not see), by guest-physical page address.
        self.written_pages: set[int] | None = None
        for gpa, size in ranges:
            self.add_region(gpa, size, backing)

    def add_region(
        self, gpa: int, size: int, backing: str = "memfd", reserved: mmap.mmap | None = None
    ) -> Region:
        """A new zeroed region: ``backing`` ``memfd`` or ``anonymous``; over
        ``reserved`` (``reserve``, ``size`` bytes: the region owns it) if given. More
        than the host has (RAM and swap: a shared memfd is not held to the
        overcommit limit, so this is checked here) or an mmap the host refuses
        (ENOMEM) is a one-line EnforceError, with the regions mapped so far unmapped."""
        self._check_new(gpa, size)
        if backing not in ("memfd", "anonymous"):
            raise ValueError(f"unknown backing {backing!r}")
        if reserved is not None and len(reserved) != size:
            raise GuestMemoryError(f"a reservation of {len(reserved)} bytes for {size}")
        if size > _host_memory():
            self._refuse(gpa, size, "more than its RAM and swap together")
        if backing == "memfd":
            fd = os.memfd_create(f"osvmm-ram-{gpa:#x}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                if reserved is not None:
                    _map_over(reserved, fd, 0, mmap.MAP_SHARED)
                    mem = reserved
                else:
                    mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                os.close(fd)
                if e.errno == errno.ENOMEM:
                    self._refuse(gpa, size, "mmap failed with ENOMEM")
                if e.errno != errno.EFBIG:
                    raise GuestMemoryError(
                        f"cannot map {size >> 10} KiB of guest memory: {e.strerror}"
                    ) from None
                # A file-size limit (RLIMIT_FSIZE) binds a memfd too: the memory is
                # anonymous then, as it would be without the memfd (it still works;
                # only a live upgrade cannot hand it over without copying).
            else:
                return self._add(Region(gpa, size, mem, "memfd", fd))
        try:
            if reserved is not None:  # counted against overcommit now, as a plain mapping
                _map_over(reserved, -1, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                mem = reserved
            else:
                mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as e:
            if e.errno != errno.ENOMEM:
                raise
            self._refuse(gpa, size, "mmap failed with ENOMEM")
        return self._add(Region(gpa, size, mem, "anonymous"))

    def _refuse(self, gpa: int, size: int, why: str):
        self.close()  # the regions mapped so far
        raise EnforceError(
            f"the host cannot give that much guest memory: {format_bytes(size)} at {gpa:#x}, "
            f"{why} (its free memory or overcommit limit)"
        )

    def add_fd_region(self, gpa: int, size: int, fd: int) -> Region:
        """``size`` bytes of the memfd ``fd`` (another VMM's guest RAM) at ``gpa``, mapped
        shared: the same pages, nothing copied. The region owns ``fd``."""
        self._check_new(gpa, size)
        if os.fstat(fd).st_size < size:
            raise GuestMemoryError(f"the memfd for {gpa:#x}+{size:#x} is smaller")
        mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return self._add(Region(gpa, size, mem, "memfd", fd))

    def add_file_region(
        self, gpa: int, size: int, fd: int, offset: int, reserved: mmap.mmap | None = None
    ) -> Region:
        """``size`` bytes of the file ``fd`` from ``offset`` at ``gpa``, mapped private
        (copy-on-write: the file is never written); over ``reserved`` (``reserve``,
        ``size`` bytes) if given. The region owns ``fd`` and ``reserved``."""
        self._check_new(gpa, size)
        if reserved is not None:
            if len(reserved) != size:
                raise GuestMemoryError(f"a reservation of {len(reserved)} bytes for {size}")
            try:
                _map_over(reserved, fd, offset, mmap.MAP_PRIVATE)
            except OSError as e:
                raise GuestMemoryError(f"cannot map the snapshot's memory: {e.strerror}") from None
            mem = reserved
        else:
            mem = mmap.mmap(
                fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
            )
        return self._add(Region(gpa, size, mem, "file", fd, offset))

    def _check_new(self, gpa: int, size: int) -> None:
        if size <= 0 or gpa < 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise GuestMemoryError(f"region {gpa:#x}+{size:#x} is not page aligned and non-empty")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise GuestMemoryError(
                    f"region {gpa:#x}+{size:#x} overlaps region {r.gpa:#x}+{r.size:#x}"
                )

    def _add(self, region: Region) -> Region:
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
        if self.written_pages is not None and len(data):
            first, last = gpa // PAGE_SIZE, (gpa + len(data) - 1) // PAGE_SIZE
            self.written_pages.update(p * PAGE_SIZE for p in range(first, last + 1))

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

    def check_own(self, what: str) -> None:
        """GuestMemoryError when a region's pages were handed to another process
        (``Region.shared_out``): they are not this VMM's to be ``what``."""
        for r in self.regions:
            if r.shared_out:
                raise GuestMemoryError(
                    f"guest memory at {r.gpa:#x} was handed to another process: not {what} here"
                )

    def zero(self) -> None:
        """Make all of guest memory read as zeros, as a fresh region does. Its pages
        are given back: a memfd's by MADV_REMOVE (the file's pages freed: what any
        mapping of it reads next is zero), anonymous memory's by MADV_DONTNEED (the
        next touch gets a zero page); the mapping's NUMA policy and huge-page advice
        stay. Where the kernel refuses (locked memory), and for a snapshot's file
        mapped copy-on-write (dropping its pages would bring the file's back), the
        bytes are overwritten with zeros in place. Memory handed to another process
        is refused (``check_own``)."""
        self.check_own("zeroed")
        for r in self.regions:
            advice = {"memfd": mmap.MADV_REMOVE, "anonymous": mmap.MADV_DONTNEED}.get(r.backing)
            try:
                if advice is None:
                    raise OSError(errno.EINVAL, "not a region whose pages can be given back")
                r.mem.madvise(advice)
            except OSError:
                ctypes.memset(r.host_addr, 0, r.size)

    def close(self) -> None:
        for r in self.regions:
            r.mem.close()
            if r.fd is not None:
                os.close(r.fd)
                r.fd = None
        self.regions.clear()


def _host_memory() -> int:
    """Bytes of RAM and swap on this host (/proc/meminfo), or no limit if unknown."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "SwapTotal"):
                    total += int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return 1 << 64
    return total or 1 << 64
