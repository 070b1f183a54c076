"""GuestMemory (regions, read/write/view, typed errors) and the RAM layout around the MMIO hole."""

from __future__ import annotations

import ctypes

import pytest

from osvmm.arch.x86 import layout
from osvmm.errors import GuestMemoryError, OsvmmError
from osvmm.vmm.memory import GuestMemory

MiB = layout.MiB
PAGE_SIZE = layout.PAGE_SIZE


@pytest.fixture
def mem():
    """Two regions with a hole between them: [0, 1 MiB) and [2 MiB, 2 MiB + 64 KiB)."""
    m = GuestMemory([(0, MiB), (2 * MiB, 0x10000)])
    yield m
    m.close()


def test_regions_size_end_and_order():
    m = GuestMemory([(0x200000, 0x1000), (0, 0x2000)])
    assert [(r.gpa, r.size, r.end) for r in m.regions] == [
        (0, 0x2000, 0x2000),
        (0x200000, 0x1000, 0x201000),
    ]
    assert m.size == 0x3000
    assert m.end == 0x201000
    m.close()
    assert m.regions == []


def test_new_memory_reads_zero_and_write_read_round_trip(mem):
    assert mem.read(0x1000, 16) == bytes(16)
    mem.write(0x1000, b"osvmm")
    assert mem.read(0x1000, 5) == b"osvmm"
    mem.write(2 * MiB + 0xFFFC, bytearray(b"\x01\x02\x03\x04"))  # the last bytes of a region
    assert mem.read(2 * MiB + 0xFFFC, 4) == b"\x01\x02\x03\x04"
    mem.write(0, memoryview(b"\xaa"))
    assert mem.read(0, 1) == b"\xaa"
    assert isinstance(mem.read(0, 1), bytes)


def test_fill(mem):
    mem.fill(0x3000, 0x20, 0x5A)
    assert mem.read(0x2FFF, 0x22) == b"\x00" + b"\x5a" * 0x20 + b"\x00"


def test_view_is_a_writable_window_without_copy(mem):
    v = mem.view(0x4000, 8)
    v[:4] = b"abcd"
    assert mem.read(0x4000, 4) == b"abcd"
    mem.write(0x4004, b"efgh")
    assert bytes(v) == b"abcdefgh"
    v.release()


def test_host_addr_points_at_the_mapping(mem):
    region = mem.region_of(2 * MiB)
    mem.write(2 * MiB + 0x10, b"host")
    assert ctypes.string_at(region.host_addr + 0x10, 4) == b"host"
    assert region.host_addr % PAGE_SIZE == 0


def test_contains_and_region_of(mem):
    assert mem.contains(0) and mem.contains(MiB - 1)
    assert not mem.contains(MiB)
    assert mem.contains(MiB - 4, 4)
    assert not mem.contains(MiB - 4, 5)
    assert mem.region_of(2 * MiB + 5).gpa == 2 * MiB


@pytest.mark.parametrize(
    ("gpa", "size"),
    [
        (MiB, 1),  # in the hole
        (MiB - 2, 4),  # runs off the end of the first region
        (2 * MiB - 1, 2),  # starts in the hole
        (2 * MiB + 0x10000, 1),  # one past the last region
        (1 << 40, 8),
        (-1, 1),
    ],
)
def test_out_of_range_accesses_raise(mem, gpa, size):
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, size)
    with pytest.raises(GuestMemoryError):
        mem.write(gpa, bytes(size))
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, size)


def test_negative_size_is_out_of_range(mem):
    with pytest.raises(GuestMemoryError):
        mem.read(0x1000, -0x800)
    with pytest.raises(GuestMemoryError):
        mem.view(0x1000, -1)


def test_a_range_straddling_two_adjacent_regions_raises():
    m = GuestMemory([(0, 0x1000), (0x1000, 0x1000)])
    assert m.read(0xFFC, 4) == bytes(4)
    assert m.read(0x1000, 4) == bytes(4)
    with pytest.raises(GuestMemoryError, match="0xffc"):
        m.read(0xFFC, 8)
    with pytest.raises(GuestMemoryError):
        m.write(0xFFF, b"ab")
    m.close()


def test_errors_are_one_line_osvmm_errors(mem):
    with pytest.raises(OsvmmError) as info:
        mem.read(MiB, 16)
    assert "\n" not in str(info.value)
    assert info.value.exit_status == 2


@pytest.mark.parametrize(
    ("gpa", "size"),
    [(0x800, 0x1000), (0x1000, 0x800), (0x1000, 0), (0x1000, -0x1000), (-0x1000, 0x1000)],
)
def test_misaligned_or_empty_regions_are_rejected(gpa, size):
    with pytest.raises(GuestMemoryError, match="page aligned"):
        GuestMemory([(gpa, size)])


@pytest.mark.parametrize(
    ("gpa", "size"),
    [(0, 0x1000), (0x3000, 0x1000), (0x1000, 0x4000), (0x3000, 0x3000), (0, 0x10000)],
)
def test_overlapping_regions_are_rejected(gpa, size):
    m = GuestMemory([(0x2000, 0x2000)])
    m.add_region(0x4000, 0x1000)  # adjacent is fine
    m.add_region(0x1000, 0x1000)
    if (gpa, size) in ((0, 0x1000),):
        m.add_region(gpa, size)  # below everything: fine
        return
    with pytest.raises(GuestMemoryError, match="overlaps"):
        m.add_region(gpa, size)
    assert [r.gpa for r in m.regions] == [0x1000, 0x2000, 0x4000]
    m.close()


def test_added_region_is_fresh_memory_of_its_own():
    m = GuestMemory([(0, 0x1000)])
    m.write(0, b"\xff" * 0x1000)
    r = m.add_region(0xF0000, 0x10000)
    assert m.region_of(0xF0000 + 0xFFFF) is r
    assert m.read(0xF0000, 0x10000) == bytes(0x10000)  # zeroed, not an alias of region 0
    m.write(0xF0000, b"rom")
    assert r.mem[:3] == b"rom" and m.read(0, 3) == b"\xff" * 3
    m.close()


# -- layout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [layout.MIN_MEMORY, 256 * MiB, 3 * layout.GiB])
def test_ram_regions_below_the_hole(size):
    assert layout.ram_regions(size) == [(0, size)]


@pytest.mark.parametrize(
    ("size", "above"),
    [
        (3 * layout.GiB + PAGE_SIZE, PAGE_SIZE),
        (4 * layout.GiB, layout.GiB),
        (8 * layout.GiB, 5 * layout.GiB),
    ],
)
def test_ram_regions_above_the_hole(size, above):
    regions = layout.ram_regions(size)
    assert regions == [(0, layout.MMIO_HOLE_START), (layout.MMIO_HOLE_END, above)]
    assert sum(s for _, s in regions) == size
    # Nothing lands in the MMIO hole.
    for gpa, s in regions:
        assert gpa + s <= layout.MMIO_HOLE_START or gpa >= layout.MMIO_HOLE_END


def test_layout_constants_are_consistent():
    assert layout.MMIO_HOLE_START <= layout.CHANNEL_WINDOW_START
    assert layout.CHANNEL_WINDOW_START + layout.CHANNEL_WINDOW_SIZE <= layout.IOAPIC_ADDR
    assert layout.IOAPIC_ADDR < layout.LAPIC_ADDR < layout.MMIO_HOLE_END
    assert layout.KVM_IDENTITY_MAP_ADDR + PAGE_SIZE == layout.KVM_TSS_ADDR
    # KVM's TSS (3 pages) and identity-map page sit above the LAPIC, below 0xfffc0000.
    assert layout.LAPIC_ADDR + PAGE_SIZE <= layout.KVM_IDENTITY_MAP_ADDR
    assert layout.KVM_TSS_ADDR + 3 * PAGE_SIZE <= 0xFFFC_0000
    assert layout.CMDLINE_ADDR + layout.CMDLINE_MAX <= layout.EBDA_START
    assert layout.ACPI_TABLES_ADDR + layout.ACPI_TABLES_MAX <= layout.HIGH_MEMORY_START
    low = [
        (layout.GDT_ADDR, 5 * 8),
        (layout.PVH_START_INFO_ADDR, 0x40),
        (layout.ZERO_PAGE_ADDR, PAGE_SIZE),
        (layout.PML4_ADDR, 6 * PAGE_SIZE),
        (layout.CMDLINE_ADDR, layout.CMDLINE_MAX),
    ]
    for (a, sa), (b, _) in zip(low, low[1:], strict=False):
        assert a + sa <= b, hex(a)


def test_host_refusing_the_memory_is_a_one_line_input_error(monkeypatch):
    """ENOMEM from mmap (osvmm run --memory 1T on a smaller host) says the host cannot
    give that much, with exit status 2, and unmaps what was mapped before it."""
    import errno
    import mmap as mmap_module

    from osvmm.errors import EXIT_USAGE, EnforceError
    from osvmm.vmm import memory as memory_module

    real = mmap_module.mmap
    made = []

    def fake_mmap(fd, size, *args, **kw):
        if size > 0x10000:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        made.append(real(fd, size, *args, **kw))
        return made[-1]

    monkeypatch.setattr(memory_module.mmap, "mmap", fake_mmap)
    with pytest.raises(EnforceError) as exc:
        GuestMemory([(0, 0x1000), (1 << 32, 1 << 30)])
    assert "the host cannot give that much guest memory: 1 GiB at 0x100000000" in str(exc.value)
    assert exc.value.exit_status == EXIT_USAGE
    assert made and made[0].closed


def test_more_than_the_host_has_is_refused_before_mapping():
    """A shared memfd is not held to the overcommit limit: the size is checked first."""
    from osvmm.errors import EnforceError

    with pytest.raises(EnforceError, match="more than its RAM and swap together"):
        GuestMemory([(0, 0x1000), (1 << 32, 1 << 50)])


# -- what backs a region ---------------------------------------------------------------


def test_memory_is_a_memfd_another_mapping_of_which_sees_the_same_bytes():
    import mmap
    import os

    m = GuestMemory([(0, MiB)])
    try:
        region = m.regions[0]
        assert region.backing == "memfd" and region.fd is not None
        assert os.readlink(f"/proc/self/fd/{region.fd}").startswith("/memfd:osvmm-ram")
        other = mmap.mmap(region.fd, MiB, mmap.MAP_SHARED)  # as another process would map it
        m.write(0x1000, b"same pages")
        assert other[0x1000:0x100A] == b"same pages"
        other[0x2000:0x2004] = b"back"
        assert m.read(0x2000, 4) == b"back"
        other.close()
    finally:
        m.close()
    assert region.fd is None  # closed with the memory


def test_anonymous_backing_has_no_fd():
    m = GuestMemory([(0, MiB)], backing="anonymous")
    assert m.regions[0].backing == "anonymous" and m.regions[0].fd is None
    m.close()


def test_a_file_region_is_copy_on_write_and_never_writes_the_file(tmp_path):
    import os

    path = tmp_path / "ram"
    path.write_bytes(b"\x00" * PAGE_SIZE + b"snapshot" + b"\x00" * (PAGE_SIZE - 8))
    m = GuestMemory([])
    m.add_file_region(0x10000, 2 * PAGE_SIZE, os.open(path, os.O_RDONLY), 0)
    try:
        assert m.read(0x10000 + PAGE_SIZE, 8) == b"snapshot"
        m.write(0x10000 + PAGE_SIZE, b"guest!")
        assert m.read(0x10000 + PAGE_SIZE, 8) == b"guest!ot"
        assert path.read_bytes()[PAGE_SIZE : PAGE_SIZE + 8] == b"snapshot"
        assert m.regions[0].backing == "file"
    finally:
        m.close()


@pytest.mark.parametrize("backing", ["memfd", "anonymous"])
def test_zero_gives_guest_memory_back_as_zeros(backing):
    import os

    m = GuestMemory([(0, 2 << 20)], backing)
    try:
        m.write(0x1000, b"left behind")
        m.write(0x1F_F000, b"x")
        m.zero()
        assert m.read(0x1000, 11) == bytes(11) and m.read(0x1F_F000, 1) == b"\0"
        if backing == "memfd":  # the file itself, as another mapping would read it
            assert os.pread(m.regions[0].fd, 11, 0x1000) == bytes(11)
    finally:
        m.close()


def test_memory_handed_to_another_process_is_never_zeroed():
    m = GuestMemory([(0, 1 << 20)])
    try:
        m.write(0, b"theirs")
        m.regions[0].shared_out = True
        with pytest.raises(GuestMemoryError, match="handed to another process: not zeroed"):
            m.zero()
        assert m.read(0, 6) == b"theirs"
    finally:
        m.close()


@pytest.mark.parametrize("backing", ["memfd", "anonymous", "file"])
def test_a_region_over_a_reservation_keeps_its_host_address(tmp_path, backing):
    """vmm/ready.py registers memslots on reservations; the region mapped over one
    later must lie at the very address, and behave as its backing does."""
    import os

    from osvmm.vmm.memory import reserve

    size = 4 * PAGE_SIZE
    reserved = reserve(size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(reserved))
    m = GuestMemory([])
    try:
        if backing == "file":
            image = tmp_path / "memory"
            image.write_bytes(b"\x11" * PAGE_SIZE + bytes(3 * PAGE_SIZE))
            fd = os.open(image, os.O_RDONLY)
            region = m.add_file_region(0, size, fd, 0, reserved)
            assert m.read(0, 2) == b"\x11\x11"
        else:
            region = m.add_region(0, size, backing, reserved)
            assert m.read(0, size) == bytes(size)
        assert region.host_addr == addr and region.backing == backing
        m.write(PAGE_SIZE, b"guest")
        assert m.read(PAGE_SIZE, 5) == b"guest"
        if backing == "file":  # copy-on-write: the file is never written
            assert image.read_bytes()[PAGE_SIZE : PAGE_SIZE + 5] == bytes(5)
    finally:
        m.close()


def test_a_reservation_of_another_size_is_refused():
    from osvmm.vmm.memory import reserve

    reserved = reserve(2 * PAGE_SIZE)
    m = GuestMemory([])
    with pytest.raises(GuestMemoryError, match="a reservation of 8192 bytes for 4096"):
        m.add_region(0, PAGE_SIZE, "memfd", reserved)
    reserved.close()
