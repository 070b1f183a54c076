"""Guest memory images: sparse files of guest RAM, zero pages left as holes.

An image holds a partition's RAM regions one after the other (each at a
page-aligned file offset the state records). Only the pages that are not all
zero are written; the rest of the file is a hole, which reads as zeros and,
on a file system with holes (ext4, xfs, btrfs, tmpfs), takes no space. The
state lists each written run of pages as an *extent* ``[offset, length,
crc32]``: at most MAX_EXTENT bytes, its CRC-32 (zlib) over its bytes.

``write_image`` writes an image from buffers (mmaps of guest memory) and
returns the extents; which pages to look at comes from the caller
(``fd_data_ranges`` for a memfd or a file, ``touched_ranges`` for any
mapping: pages never touched are skipped without being read, so a 1 GiB
partition that used 10 MiB costs about 10 MiB of reading). ``check_image``
verifies an image against its extents before anything is restored from it:
its size, every extent's CRC, and that whatever data lies outside the
extents is zero. ``load_image`` copies the extents into a buffer (a restore
that copies; the other maps the image copy-on-write, vmm/memory.py).

No KVM and no partition here; Linux file and /proc interfaces only.
"""

from __future__ import annotations

import errno
import mmap
import os
import zlib
from array import array

from osvmm.arch.x86.layout import PAGE_SIZE
from osvmm.errors import SnapshotError

MAX_EXTENT = 4 << 20  # bytes per extent at most (each has its own CRC)
_SCAN_CHUNK = 64 * PAGE_SIZE
_ZERO_CHUNK = bytes(_SCAN_CHUNK)
_ZERO_PAGE = bytes(PAGE_SIZE)

# /proc/self/pagemap bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61  # a file page or shared anonymous memory

Range = tuple[int, int]  # [start, end) in bytes


def fd_data_ranges(fd: int, start: int, end: int) -> list[Range]:
    """The page-aligned ranges of [start, end) of file ``fd`` that hold data
    (SEEK_DATA/SEEK_HOLE), relative to ``start``. A memfd reports the pages ever
    touched; a file system without holes reports everything."""
    out: list[Range] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            if e.errno == errno.EINVAL:  # SEEK_DATA unsupported: all of it is data
                return [(0, end - start)]
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        lo = data // PAGE_SIZE * PAGE_SIZE
        hi = min(-(-hole // PAGE_SIZE) * PAGE_SIZE, end)
        out.append((lo - start, hi - start))
        pos = hole
    return _merge(out)


def touched_ranges(addr: int, size: int, private_only: bool = False) -> list[Range]:
    """The pages of the mapping at host address ``addr`` that are present or swapped
    (/proc/self/pagemap), relative to ``addr``: a page never touched reads as zero
    and is left out. ``private_only``: only pages the process itself owns (in a
    private file mapping, those the guest wrote; the others are the file's)."""
    pages = size // PAGE_SIZE
    entries = array("Q")
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        f.seek(addr // PAGE_SIZE * 8)
        raw = f.read(pages * 8)
    entries.frombytes(raw[: len(raw) // 8 * 8])
    out: list[Range] = []
    run = -1
    for i, e in enumerate(entries):
        used = e & (PM_PRESENT | PM_SWAP) and not (private_only and e & PM_FILE)
        if used and run < 0:
            run = i
        elif not used and run >= 0:
            out.append((run * PAGE_SIZE, i * PAGE_SIZE))
            run = -1
    if run >= 0:
        out.append((run * PAGE_SIZE, len(entries) * PAGE_SIZE))
    return out


def _merge(ranges) -> list[Range]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def union(*range_lists) -> list[Range]:
    return _merge([r for rl in range_lists for r in rl])


def nonzero_pages(buf, candidates) -> list[Range]:
    """The runs of pages of ``buf`` within ``candidates`` that are not all zero,
    merged, each at most MAX_EXTENT bytes."""
    runs: list[list[int]] = []
    for lo, hi in candidates:
        for a in range(lo, hi, _SCAN_CHUNK):
            b = min(a + _SCAN_CHUNK, hi)
            chunk = buf[a:b]
            if chunk == _ZERO_CHUNK[: b - a]:
                continue
            for p in range(0, b - a, PAGE_SIZE):
                if chunk[p : p + PAGE_SIZE] != _ZERO_PAGE:
                    page = a + p
                    if runs and runs[-1][1] == page and page - runs[-1][0] < MAX_EXTENT:
                        runs[-1][1] = page + PAGE_SIZE
                    else:
                        runs.append([page, page + PAGE_SIZE])
    return [(lo, hi) for lo, hi in runs]


def write_image(out_fd: int, sources) -> list[list[int]]:
    """Write the non-zero pages of each source into ``out_fd``; ``sources``: (buffer,
    file offset, candidate ranges) triples. Returns the extents ``[offset, length,
    crc32]`` in file order. The caller sizes the file (ftruncate) for the holes."""
    extents = []
    for buf, file_offset, candidates in sources:
        view = memoryview(buf)
        try:
            for lo, hi in nonzero_pages(buf, candidates):
                part = view[lo:hi]
                crc = zlib.crc32(part)
                done = 0
                while done < len(part):
                    done += os.pwrite(out_fd, part[done:], file_offset + lo + done)
                part.release()
                extents.append([file_offset + lo, hi - lo, crc])
        finally:
            view.release()
    return extents


def check_image(fd: int, size: int, extents, what: str = "memory image") -> None:
    """A SnapshotError unless the image in ``fd`` is ``size`` bytes and matches its
    extents: every CRC right, no data outside them but zeros."""
    actual = os.fstat(fd).st_size
    if actual != size:
        kind = "truncated" if actual < size else "wrong size"
        raise SnapshotError(f"{what}: {kind} ({actual} bytes, the snapshot says {size})")
    if size == 0:
        return
    covered = []
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mem:
        view = memoryview(mem)
        try:
            for extent in extents:
                off, length, crc = extent
                if off % PAGE_SIZE or length <= 0 or off + length > size:
                    raise SnapshotError(f"{what}: extent {off:#x}+{length:#x} is outside it")
                if zlib.crc32(view[off : off + length]) != crc:
                    raise SnapshotError(
                        f"{what}: checksum mismatch at {off:#x}+{length:#x} (corrupted)"
                    )
                covered.append((off, off + length))
            for lo, hi in _outside(fd_data_ranges(fd, 0, size), _merge(covered)):
                for a in range(lo, hi, _SCAN_CHUNK):
                    b = min(a + _SCAN_CHUNK, hi)
                    if mem[a:b] != _ZERO_CHUNK[: b - a]:
                        raise SnapshotError(
                            f"{what}: data at {a:#x} outside every extent (corrupted)"
                        )
        finally:
            view.release()


def _outside(data: list[Range], covered: list[Range]) -> list[Range]:
    """Parts of ``data`` not in ``covered`` (both sorted, merged)."""
    out = []
    j = 0
    for lo, hi in data:
        pos = lo
        while j < len(covered) and covered[j][1] <= pos:
            j += 1
        k = j
        while pos < hi and k < len(covered) and covered[k][0] < hi:
            if covered[k][0] > pos:
                out.append((pos, covered[k][0]))
            pos = max(pos, covered[k][1])
            k += 1
        if pos < hi:
            out.append((pos, hi))
    return out


def load_image(fd: int, buf, file_offset: int, size: int, extents) -> None:
    """Copy the extents of image ``fd`` lying in [file_offset, file_offset + size) into
    ``buf`` (zeroed memory of ``size`` bytes) at their places."""
    view = memoryview(buf)
    try:
        for off, length, _crc in extents:
            if off >= file_offset + size or off + length <= file_offset:
                continue
            dst = off - file_offset
            target = view[dst : dst + length]
            done = 0
            while done < length:
                n = os.preadv(fd, [target[done:]], off + done)
                if n <= 0:
                    raise SnapshotError(f"memory image: truncated at {off + done:#x}")
                done += n
            target.release()
    finally:
        view.release()
