"""virtio-blk's model on a real raw image (vmm/blockfile.py's RawImage): read,
write, flush, get-id, discard (holes punched), read-only, and every refusal;
open_drive's checks of an image file."""

from __future__ import annotations

import os
import struct

import pytest

from osvmm.devices.virtio import spec
from osvmm.devices.virtio.blk import MAX_DISCARD_SEG, SEG_MAX, VirtioBlk
from osvmm.devices.virtio.queue import QueueError, Virtqueue
from osvmm.errors import ConfigError
from osvmm.vmm.blockfile import open_drive
from tests.virtio_driver import AVAIL, DESC, INDIRECT, USED, Driver, memory

SECTORS = 64


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return path


@pytest.fixture
def mem():
    m = memory()
    yield m
    m.close()


def device(mem, image, readonly=False):
    backend = open_drive(str(image), readonly)
    blk = VirtioBlk(backend, mem, serial=b"osvmm-disk-0")
    q = Virtqueue(mem, 16, DESC, AVAIL, USED, indirect=True)
    return blk, q, Driver(mem, 16), backend


def request(d, kind, sector, data=b"", inlen=0, status_len=1):
    """One request: header, data to the device, room for data from it, status."""
    segs = [(d.buffer(struct.pack("<IIQ", kind, 0, sector)), 16, False)]
    if data:
        segs.append((d.buffer(data), len(data), False))
    inbuf = None
    if inlen:
        inbuf = d.buffer(inlen)
        segs.append((inbuf, inlen, True))
    status = d.buffer(b"\xee" * status_len)
    if status_len:
        segs.append((status, status_len, True))
    head = d.avail_idx % d.size * 4  # four descriptors per request at most
    d.make_available(d.chain(segs, first=head))
    return inbuf, status


def answer(blk, q, d, status):
    assert blk.serve(0, q) is True
    (used,) = d.take_used()
    return used[1], d.mem.read(status, 1)[0]


def test_config_and_features(mem, image):
    blk, *_ = device(mem, image)
    capacity, size_max, seg_max = struct.unpack_from("<QII", blk.config)
    assert capacity == SECTORS and seg_max == SEG_MAX and size_max == 0
    f = blk.features
    assert f >> spec.VIRTIO_F_VERSION_1 & 1 and f >> spec.VIRTIO_BLK_F_FLUSH & 1
    assert not f >> spec.VIRTIO_BLK_F_RO & 1
    max_discard, max_seg, align = struct.unpack_from("<III", blk.config, 36)
    if blk.discard:
        assert f >> spec.VIRTIO_BLK_F_DISCARD & 1 and max_seg == MAX_DISCARD_SEG and align == 8
    else:
        assert max_discard == max_seg == 0


def test_read(mem, image):
    blk, q, d, _ = device(mem, image)
    inbuf, status = request(d, spec.VIRTIO_BLK_T_IN, 3, inlen=1024)
    written, st = answer(blk, q, d, status)
    assert st == spec.VIRTIO_BLK_S_OK and written == 1025
    assert mem.read(inbuf, 1024) == image.read_bytes()[3 * 512 : 5 * 512]


def test_read_into_scattered_buffers_through_an_indirect_table(mem, image):
    blk, q, d, _ = device(mem, image)
    hdr = d.buffer(struct.pack("<IIQ", spec.VIRTIO_BLK_T_IN, 0, 1))
    parts = [d.buffer(100), d.buffer(412), d.buffer(512)]
    status = d.buffer(1)
    d.chain(
        [(hdr, 16, False), (parts[0], 100, True), (parts[1], 412, True), (parts[2], 512, True)]
        + [(status, 1, True)],
        table=INDIRECT,
    )
    d.set_desc(0, INDIRECT, 5 * 16, spec.VIRTQ_DESC_F_INDIRECT)
    d.make_available(0)
    assert answer(blk, q, d, status) == (1025, 0)
    got = mem.read(parts[0], 100) + mem.read(parts[1], 412) + mem.read(parts[2], 512)
    assert got == image.read_bytes()[512 : 512 + 1024]


def test_write_then_read_back_and_flush(mem, image):
    blk, q, d, backend = device(mem, image)
    payload = os.urandom(1536)
    _, status = request(d, spec.VIRTIO_BLK_T_OUT, 10, data=payload)
    assert answer(blk, q, d, status) == (1, 0)
    _, status = request(d, spec.VIRTIO_BLK_T_FLUSH, 0)
    assert answer(blk, q, d, status) == (1, 0)
    backend.close()
    assert image.read_bytes()[10 * 512 : 13 * 512] == payload


def test_get_id(mem, image):
    blk, q, d, _ = device(mem, image)
    inbuf, status = request(d, spec.VIRTIO_BLK_T_GET_ID, 0, inlen=20)
    assert answer(blk, q, d, status) == (21, 0)
    assert mem.read(inbuf, 20) == b"osvmm-disk-0".ljust(20, b"\0")


@pytest.mark.parametrize(
    ("kind", "sector", "data", "inlen"),
    [
        (spec.VIRTIO_BLK_T_IN, SECTORS - 1, b"", 1024),  # past the end
        (spec.VIRTIO_BLK_T_IN, 0, b"", 100),  # not whole sectors
        (spec.VIRTIO_BLK_T_IN, 1 << 60, b"", 512),
        (spec.VIRTIO_BLK_T_OUT, SECTORS, b"x" * 512, 0),
        (spec.VIRTIO_BLK_T_OUT, 0, b"x" * 500, 0),
    ],
)
def test_out_of_range_or_partial_sectors_are_ioerr(mem, image, kind, sector, data, inlen):
    blk, q, d, backend = device(mem, image)
    before = image.read_bytes()
    _, status = request(d, kind, sector, data=data, inlen=inlen)
    assert answer(blk, q, d, status) == (1, spec.VIRTIO_BLK_S_IOERR)
    backend.close()
    assert image.read_bytes() == before


def test_unknown_type_is_unsupp_and_a_short_header_ioerr(mem, image):
    blk, q, d, _ = device(mem, image)
    _, status = request(d, 99, 0)
    assert answer(blk, q, d, status) == (1, spec.VIRTIO_BLK_S_UNSUPP)
    status = d.buffer(1)
    d.make_available(d.chain([(d.buffer(8), 8, False), (status, 1, True)], first=8))
    assert answer(blk, q, d, status) == (1, spec.VIRTIO_BLK_S_IOERR)


def test_a_request_without_a_status_byte_breaks_the_queue(mem, image):
    blk, q, d, _ = device(mem, image)
    request(d, spec.VIRTIO_BLK_T_IN, 0, status_len=0)
    with pytest.raises(QueueError, match="status byte"):
        blk.serve(0, q)


def test_read_only_refuses_writes_and_discards(mem, image):
    blk, q, d, backend = device(mem, image, readonly=True)
    assert blk.features >> spec.VIRTIO_BLK_F_RO & 1
    assert not blk.features >> spec.VIRTIO_BLK_F_DISCARD & 1
    before = image.read_bytes()
    _, status = request(d, spec.VIRTIO_BLK_T_OUT, 0, data=b"y" * 512)
    assert answer(blk, q, d, status) == (1, spec.VIRTIO_BLK_S_IOERR)
    _, status = request(d, spec.VIRTIO_BLK_T_DISCARD, 0, data=struct.pack("<QII", 0, 8, 0))
    assert answer(blk, q, d, status) == (1, spec.VIRTIO_BLK_S_UNSUPP)
    _, status = request(d, spec.VIRTIO_BLK_T_FLUSH, 0)
    assert answer(blk, q, d, status) == (1, 0)
    inbuf, status = request(d, spec.VIRTIO_BLK_T_IN, 0, inlen=512)
    assert answer(blk, q, d, status) == (513, 0)
    backend.close()
    assert image.read_bytes() == before


def test_discard_punches_a_hole(mem, image):
    blk, q, d, backend = device(mem, image)
    if not blk.discard:
        pytest.skip("this file system cannot punch holes (fallocate PUNCH_HOLE)")
    segs = struct.pack("<QII", 8, 16, 0) + struct.pack("<QII", 40, 8, 1)
    _, status = request(d, spec.VIRTIO_BLK_T_DISCARD, 0, data=segs)
    assert answer(blk, q, d, status) == (1, 0)
    backend.close()
    data = image.read_bytes()
    assert len(data) == SECTORS * 512  # the size is kept
    assert data[8 * 512 : 24 * 512] == bytes(16 * 512)
    assert data[40 * 512 : 48 * 512] == bytes(8 * 512)
    assert data[24 * 512 : 25 * 512] == (bytes(range(256)) * 2)


@pytest.mark.parametrize(
    ("segments", "expect"),
    [
        (struct.pack("<QII", SECTORS - 4, 8, 0), spec.VIRTIO_BLK_S_IOERR),
        (struct.pack("<QII", 0, 8, 2), spec.VIRTIO_BLK_S_UNSUPP),  # reserved flag
        (struct.pack("<QII", 0, 8, 0)[:12], spec.VIRTIO_BLK_S_IOERR),
        (struct.pack("<QII", 0, 1, 0) * (MAX_DISCARD_SEG + 1), spec.VIRTIO_BLK_S_IOERR),
    ],
)
def test_bad_discards(mem, image, segments, expect):
    blk, q, d, backend = device(mem, image)
    if not blk.discard:
        pytest.skip("this file system cannot punch holes (fallocate PUNCH_HOLE)")
    before = image.read_bytes()
    _, status = request(d, spec.VIRTIO_BLK_T_DISCARD, 0, data=segments)
    assert answer(blk, q, d, status) == (1, expect)
    backend.close()
    assert image.read_bytes() == before


def test_a_host_io_error_is_ioerr(mem, image):
    blk, q, d, backend = device(mem, image)

    def fail(offset, views):
        raise OSError(5, "Input/output error")

    backend.read_into = fail
    _, status = request(d, spec.VIRTIO_BLK_T_IN, 0, inlen=512)
    assert answer(blk, q, d, status) == (1, spec.VIRTIO_BLK_S_IOERR)


def test_many_requests_in_one_serve(mem, image):
    blk, q, d, _ = device(mem, image)
    statuses = [request(d, spec.VIRTIO_BLK_T_IN, i, inlen=512)[1] for i in range(4)]
    assert blk.serve(0, q)
    assert [w for _, w in d.take_used()] == [513] * 4
    assert all(mem.read(s, 1) == b"\0" for s in statuses)
    assert not blk.serve(0, q)  # nothing new


# -- open_drive --------------------------------------------------------------------------


def test_open_drive_refuses_what_is_no_disk(tmp_path):
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    cases = {
        str(tmp_path / "missing.img"): "no such file",
        str(tmp_path): "is a directory",
        str(odd): "1000 bytes is not a whole number of 512-byte sectors",
        str(empty): "the image is empty",
        "/dev/null": "not a regular file",
    }
    for path, why in cases.items():
        with pytest.raises(ConfigError, match=why) as err:
            open_drive(path, readonly=False)
        assert "\n" not in str(err.value) and str(err.value).startswith(f"--drive {path}: ")


def test_open_drive_locks_a_writable_image(image):
    first = open_drive(str(image), readonly=False)
    try:
        with pytest.raises(ConfigError, match="in use by another VM"):
            open_drive(str(image), readonly=False)
        with pytest.raises(ConfigError, match="in use by another VM"):
            open_drive(str(image), readonly=True)
    finally:
        first.close()
    a, b = open_drive(str(image), readonly=True), open_drive(str(image), readonly=True)
    a.close()
    b.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any file")
def test_open_drive_unwritable_image(image):
    image.chmod(0o444)
    with pytest.raises(ConfigError, match="add ,ro"):
        open_drive(str(image), readonly=False)
    open_drive(str(image), readonly=True).close()
