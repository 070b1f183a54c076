"""virtio-blk (virtio 1.2 section 5.2): the device model, no I/O of its own.

Its backend (vmm/blockfile.py's RawImage, or a test's) does the I/O:

    size          bytes, a multiple of 512
    readonly      writes and discards are refused
    can_discard   whether a discard can free the range (fallocate PUNCH_HOLE)
    read_into(offset, views)   fill the memoryviews from the image at offset
    write_from(offset, views)  write the memoryviews' bytes at offset
    flush()       make written data durable (fdatasync)
    discard(offset, length)

Data moves between the image and guest memory through views of guest RAM,
without a copy in between. One queue (requestq) of ``QUEUE_MAX`` entries.

Requests (5.2.6): IN (read), OUT (write), FLUSH, GET_ID, DISCARD. A request
answers OK, IOERR (outside the disk, not whole sectors, a write to a read-only
disk, the backend's OSError) or UNSUPP (an unknown type, a discard where none is
offered or with reserved flags). A request too short to hold its header is
IOERR; one without a device-writable byte for its status cannot be answered and
breaks the queue (DEVICE_NEEDS_RESET, mmio.py).
"""

from __future__ import annotations

import struct

from osvmm.devices.virtio import spec
from osvmm.devices.virtio.queue import Chain, QueueError

QUEUE_MAX = 256
# Data segments per request: the queue holds the header and the status besides (5.2.4).
SEG_MAX = QUEUE_MAX - 2
MAX_DISCARD_SECTORS = 0x3FFFFF  # per segment, as QEMU
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB: the host file's block, where holes are punched whole
VIRTIO_BLK_DISCARD_F_UNMAP = 1

_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
_DISCARD_SEG = struct.Struct("<QII")  # sector, num_sectors, flags
# struct virtio_blk_config up to what is offered (5.2.4): capacity, size_max,
# seg_max, geometry, blk_size, topology, writeback, unused0, num_queues, and the
# discard and write-zeroes limits.
_CONFIG = struct.Struct("<QII4sI8sBBHIIIIIB3s")
assert _CONFIG.size == 60


class VirtioBlk:
    device_id = spec.VIRTIO_ID_BLOCK
    num_queues = 1
    queue_max = QUEUE_MAX

    def __init__(self, backend, memory, serial: bytes = b""):
        """``serial``: what GET_ID answers (at most 20 bytes; /sys/block/vdX/serial)."""
        self.backend = backend
        self.memory = memory
        self.serial = serial[: spec.VIRTIO_BLK_ID_BYTES]
        self.readonly = bool(backend.readonly)
        self.discard = bool(backend.can_discard) and not self.readonly
        features = (
            spec.TRANSPORT_FEATURES | 1 << spec.VIRTIO_BLK_F_SEG_MAX | 1 << spec.VIRTIO_BLK_F_FLUSH
        )
        if self.readonly:
            features |= 1 << spec.VIRTIO_BLK_F_RO
        if self.discard:
            features |= 1 << spec.VIRTIO_BLK_F_DISCARD
        self.features = features
        self.sectors = backend.size // spec.SECTOR_SIZE
        self.config = _CONFIG.pack(
            self.sectors,
            0,  # size_max (not offered)
            SEG_MAX,
            b"\0" * 4,  # geometry (not offered)
            spec.SECTOR_SIZE,  # blk_size (not offered: the driver assumes 512)
            b"\0" * 8,  # topology (not offered)
            0,  # writeback (VIRTIO_BLK_F_CONFIG_WCE not offered)
            0,
            1,  # num_queues (VIRTIO_BLK_F_MQ not offered)
            MAX_DISCARD_SECTORS if self.discard else 0,
            MAX_DISCARD_SEG if self.discard else 0,
            DISCARD_SECTOR_ALIGNMENT if self.discard else 0,
            0,  # write zeroes: not offered
            0,
            0,
            b"\0" * 3,
        )
        self.requests = 0  # answered, for tests and statistics
        # By kind, the bytes moved, and requests answered with an error (osvmm stat).
        self.counts = dict.fromkeys(
            ("read", "write", "flush", "get_id", "discard", "other", "errors"), 0
        ) | {"read_bytes": 0, "write_bytes": 0}

    def reset(self) -> None:
        """Nothing of its own to forget: every request is answered before serve returns."""

    def state(self) -> dict:
        """What a snapshot holds of the model: the backend's identity (its image's
        path, read-only or not, size), which a restore reopens and checks. No
        request is in flight between two serves, so there is nothing else."""
        backend = self.backend
        return {
            "kind": "blk",
            "path": getattr(backend, "path", None),
            "readonly": self.readonly,
            "size": backend.size,
        }

    def restore(self, st: dict) -> None:
        """The image was reopened and checked against ``state()`` before the
        partition was built (vmm/snapshot.py ``check_disks``): nothing to take back."""

    def serve(self, index: int, queue) -> bool:
        """Answer every available request of the request queue; whether the driver
        wants an interrupt for them."""
        pushed = False
        while True:
            chain = queue.pop()
            if chain is None:
                break
            written = self._request(chain)
            queue.push(chain.head, written)
            self.requests += 1
            pushed = True
        return pushed and queue.needs_interrupt()

    # -- one request -------------------------------------------------------------------
    def _request(self, chain: Chain) -> int:
        """Carry out one request; returns the bytes written into the chain (its data
        and the status byte)."""
        mem = self.memory
        status_at = chain.writable_len - 1
        if status_at < 0:
            raise QueueError(f"request {chain.head} has no device-writable status byte")
        if chain.readable_len < _HEADER.size:
            self._count(-1, spec.VIRTIO_BLK_S_IOERR, 0, 0)
            return self._answer(chain, status_at, spec.VIRTIO_BLK_S_IOERR, 0)
        kind, _, sector = _HEADER.unpack(chain.read(mem, 0, _HEADER.size))
        try:
            if kind == spec.VIRTIO_BLK_T_IN:
                status, data = self._read(chain, sector, status_at)
            elif kind == spec.VIRTIO_BLK_T_OUT:
                status, data = self._write(chain, sector), 0
            elif kind == spec.VIRTIO_BLK_T_FLUSH:
                if not self.readonly:
                    self.backend.flush()
                status, data = spec.VIRTIO_BLK_S_OK, 0
            elif kind == spec.VIRTIO_BLK_T_GET_ID:
                ident = self.serial.ljust(spec.VIRTIO_BLK_ID_BYTES, b"\0")[:status_at]
                data = chain.write(mem, 0, ident)
                status = spec.VIRTIO_BLK_S_OK
            elif kind == spec.VIRTIO_BLK_T_DISCARD:
                status, data = self._discard(chain), 0
            else:
                status, data = spec.VIRTIO_BLK_S_UNSUPP, 0
        except OSError:
            status, data = spec.VIRTIO_BLK_S_IOERR, 0
        self._count(kind, status, data, chain.readable_len - _HEADER.size)
        return self._answer(chain, status_at, status, data)

    _KINDS = {
        spec.VIRTIO_BLK_T_IN: "read",
        spec.VIRTIO_BLK_T_OUT: "write",
        spec.VIRTIO_BLK_T_FLUSH: "flush",
        spec.VIRTIO_BLK_T_GET_ID: "get_id",
        spec.VIRTIO_BLK_T_DISCARD: "discard",
    }

    def _count(self, kind: int, status: int, read: int, written: int) -> None:
        counts = self.counts
        name = self._KINDS.get(kind, "other")
        counts[name] += 1
        if status != spec.VIRTIO_BLK_S_OK:
            counts["errors"] += 1
        elif name == "read":
            counts["read_bytes"] += read
        elif name == "write":
            counts["write_bytes"] += written

    def _answer(self, chain: Chain, status_at: int, status: int, data: int) -> int:
        chain.write(self.memory, status_at, bytes([status]))
        return data + 1

    def _range_ok(self, sector: int, length: int) -> bool:
        return length % spec.SECTOR_SIZE == 0 and sector + length // spec.SECTOR_SIZE <= (
            self.sectors
        )

    def _read(self, chain: Chain, sector: int, length: int) -> tuple[int, int]:
        if not self._range_ok(sector, length):
            return spec.VIRTIO_BLK_S_IOERR, 0
        if length:
            self.backend.read_into(
                sector * spec.SECTOR_SIZE, chain.writable_views(self.memory, 0, length)
            )
        return spec.VIRTIO_BLK_S_OK, length

    def _write(self, chain: Chain, sector: int) -> int:
        length = chain.readable_len - _HEADER.size
        if self.readonly or not self._range_ok(sector, length):
            return spec.VIRTIO_BLK_S_IOERR
        if length:
            self.backend.write_from(
                sector * spec.SECTOR_SIZE,
                chain.readable_views(self.memory, _HEADER.size, length),
            )
        return spec.VIRTIO_BLK_S_OK

    def _discard(self, chain: Chain) -> int:
        if not self.discard:
            return spec.VIRTIO_BLK_S_UNSUPP
        length = chain.readable_len - _HEADER.size
        count = length // _DISCARD_SEG.size
        if length % _DISCARD_SEG.size or not 0 < count <= MAX_DISCARD_SEG:
            return spec.VIRTIO_BLK_S_IOERR
        raw = chain.read(self.memory, _HEADER.size, length)
        segments = [_DISCARD_SEG.unpack_from(raw, i * _DISCARD_SEG.size) for i in range(count)]
        for sector, sectors, flags in segments:
            if flags & ~VIRTIO_BLK_DISCARD_F_UNMAP:
                return spec.VIRTIO_BLK_S_UNSUPP
            if sectors > MAX_DISCARD_SECTORS or sector + sectors > self.sectors:
                return spec.VIRTIO_BLK_S_IOERR
        for sector, sectors, _ in segments:
            if sectors:
                self.backend.discard(sector * spec.SECTOR_SIZE, sectors * spec.SECTOR_SIZE)
        return spec.VIRTIO_BLK_S_OK
