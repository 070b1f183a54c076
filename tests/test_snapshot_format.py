"""The snapshot state file and memory image, without KVM: round trips, and every
kind of bad input refused with one line (truncated, corrupted, another version,
another size)."""

from __future__ import annotations

import mmap
import os
import struct
import zlib

import pytest

from osvmm.arch.x86.layout import PAGE_SIZE
from osvmm.errors import OsvmmError, SnapshotError
from osvmm.snapshot import format as fmt
from osvmm.snapshot import memfile

STATE = {
    "name": "counter",
    "vcpus": [{"regs": b"\x00\x01" * 72, "mp_state": 0, "msrs": [[16, 2**63 + 5]]}],
    "devices": {"serial": {"fifo": b"", "lcr": 3}, "rtc": {"offset": -12}},
    "clock": 1.5,
    "nothing": None,
    "flag": True,
}


def test_a_state_round_trips_with_its_bytes():
    data = fmt.encode(STATE)
    assert data[:8] == b"OSVMMSNP"
    assert fmt.decode(data) == STATE
    assert isinstance(fmt.decode(data)["vcpus"][0]["regs"], bytes)


def test_the_header_is_documented_layout():
    data = fmt.encode(STATE)
    magic, version, header, size, digest = struct.unpack_from("<8sIIQ32s", data)
    assert (magic, version, header) == (b"OSVMMSNP", 1, 64)  # no virtio devices: version 1
    assert size == len(data) - 64
    assert data[56:64] == bytes(8)


def test_a_state_with_virtio_devices_is_version_2_and_read_back():
    state = STATE | {"virtio": [{"config": b"\0" * 8, "queues": []}]}
    data = fmt.encode(state)
    assert struct.unpack_from("<I", data, 8)[0] == 2 == fmt.FORMAT_VERSION
    assert fmt.decode(data) == state
    assert fmt.version_for(STATE) == 1 and fmt.version_for(STATE | {"virtio": []}) == 1


def message(data: bytes) -> str:
    with pytest.raises(SnapshotError) as err:
        fmt.decode(data)
    text = str(err.value)
    assert "\n" not in text and err.value.exit_status == 2
    assert isinstance(err.value, OsvmmError)
    return text


def test_bad_magic():
    assert "not an osvmm snapshot" in message(b"ELF\x7f" + fmt.encode(STATE)[4:])
    assert "not an osvmm snapshot" in message(b"")


def test_truncated_anywhere():
    data = fmt.encode(STATE)
    for cut in (9, 40, 64, 65, len(data) // 2, len(data) - 1):
        assert "truncated" in message(data[:cut])


def test_extended_is_the_wrong_size():
    assert "wrong size" in message(fmt.encode(STATE) + b"\0")


def test_any_flipped_payload_byte_is_a_checksum_mismatch():
    data = bytearray(fmt.encode(STATE))
    for pos in (64, 100, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x20
        assert "checksum mismatch" in message(bytes(bad))


def test_a_flipped_checksum_byte_is_caught_too():
    bad = bytearray(fmt.encode(STATE))
    bad[30] ^= 1
    assert "checksum mismatch" in message(bytes(bad))


def test_wrong_version():
    bad = bytearray(fmt.encode(STATE))
    struct.pack_into("<I", bad, 8, 99)
    assert "format version 99; this osvmm reads versions 1, 2" in message(bytes(bad))


def test_valid_checksum_over_garbage_is_unreadable_not_a_crash():
    import hashlib

    payload = b"{not json"
    data = fmt.HEADER.pack(fmt.MAGIC, 1, 64, len(payload), hashlib.sha256(payload).digest())
    assert "unreadable" in message(data + payload)


def test_unstorable_values_are_a_bug_of_the_caller():
    with pytest.raises(TypeError):
        fmt.encode({"x": object()})
    with pytest.raises(TypeError):
        fmt.encode({1: 2})


# -- memory images -------------------------------------------------------------------------


def guest(pages: int, written: dict[int, bytes]) -> mmap.mmap:
    mem = mmap.mmap(-1, pages * PAGE_SIZE)
    for page, data in written.items():
        mem[page * PAGE_SIZE : page * PAGE_SIZE + len(data)] = data
    return mem


def image(tmp_path, mem, candidates=None):
    path = tmp_path / "memory"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, len(mem))
    extents = memfile.write_image(fd, [(mem, 0, candidates or [(0, len(mem))])])
    os.close(fd)
    return path, extents


def test_zero_pages_are_not_stored_and_the_rest_round_trips(tmp_path):
    mem = guest(1024, {0: b"boot", 1: b"x", 2: b"y", 700: b"\xff" * PAGE_SIZE, 1023: b"end"})
    mem[5 * PAGE_SIZE] = 0  # written, yet zero: not stored
    path, extents = image(tmp_path, mem)
    assert [(o // PAGE_SIZE, n // PAGE_SIZE) for o, n, _ in extents] == [
        (0, 3),
        (700, 1),
        (1023, 1),
    ]
    assert all(c == zlib.crc32(mem[o : o + n]) for o, n, c in extents)
    assert os.stat(path).st_size == len(mem)
    assert os.stat(path).st_blocks * 512 <= 64 * PAGE_SIZE  # sparse (5 pages, some slack)
    fd = os.open(path, os.O_RDONLY)
    try:
        memfile.check_image(fd, len(mem), extents)
        back = mmap.mmap(-1, len(mem))
        memfile.load_image(fd, back, 0, len(mem), extents)
        assert back[:] == mem[:]
        lazy = mmap.mmap(fd, len(mem), mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        assert lazy[:] == mem[:]
    finally:
        os.close(fd)


def test_extents_are_split_at_the_limit(tmp_path):
    pages = 2 * memfile.MAX_EXTENT // PAGE_SIZE + 3
    mem = mmap.mmap(-1, pages * PAGE_SIZE)
    mem[:] = b"\x01" * len(mem)
    _, extents = image(tmp_path, mem)
    assert [n for _, n, _ in extents] == [memfile.MAX_EXTENT] * 2 + [3 * PAGE_SIZE]


def check_message(path, size, extents) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(SnapshotError) as err:
            memfile.check_image(fd, size, extents)
    finally:
        os.close(fd)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_corrupted_stored_page_is_caught(tmp_path):
    mem = guest(64, {3: b"data"})
    path, extents = image(tmp_path, mem)
    with open(path, "r+b") as f:
        f.seek(3 * PAGE_SIZE + 1)
        f.write(b"X")
    assert "checksum mismatch" in check_message(path, len(mem), extents)


def test_data_written_into_a_hole_is_caught(tmp_path):
    mem = guest(64, {3: b"data"})
    path, extents = image(tmp_path, mem)
    with open(path, "r+b") as f:
        f.seek(40 * PAGE_SIZE)
        f.write(b"sneaky")
    assert "outside every extent" in check_message(path, len(mem), extents)


def test_truncated_and_wrong_size_images(tmp_path):
    mem = guest(64, {3: b"data"})
    path, extents = image(tmp_path, mem)
    os.truncate(path, 32 * PAGE_SIZE)
    assert "truncated" in check_message(path, len(mem), extents)
    os.truncate(path, 65 * PAGE_SIZE)
    assert "wrong size" in check_message(path, len(mem), extents)


def test_only_candidate_pages_are_read(tmp_path):
    mem = guest(64, {3: b"seen", 10: b"not a candidate"})
    _, extents = image(tmp_path, mem, candidates=[(0, 8 * PAGE_SIZE)])
    assert [(o // PAGE_SIZE, n // PAGE_SIZE) for o, n, _ in extents] == [(3, 1)]


def test_a_memfd_reports_only_touched_pages_as_data():
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 256 * PAGE_SIZE)
        mem = mmap.mmap(fd, 256 * PAGE_SIZE)
        mem[10 * PAGE_SIZE] = 1
        mem[200 * PAGE_SIZE + 5] = 1
        assert memfile.fd_data_ranges(fd, 0, 256 * PAGE_SIZE) == [
            (10 * PAGE_SIZE, 11 * PAGE_SIZE),
            (200 * PAGE_SIZE, 201 * PAGE_SIZE),
        ]
        assert memfile.fd_data_ranges(fd, 100 * PAGE_SIZE, 256 * PAGE_SIZE) == [
            (100 * PAGE_SIZE, 101 * PAGE_SIZE)
        ]
        mem.close()
    finally:
        os.close(fd)


def test_touched_ranges_of_an_anonymous_mapping():
    import ctypes

    mem = mmap.mmap(-1, 64 * PAGE_SIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    mem[7 * PAGE_SIZE] = 1
    mem[8 * PAGE_SIZE] = 1
    assert memfile.touched_ranges(addr, 64 * PAGE_SIZE) == [(7 * PAGE_SIZE, 9 * PAGE_SIZE)]
