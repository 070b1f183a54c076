"""virtio-net (virtio 1.2 section 5.1): the device model, no I/O of its own.

Two queues: receiveq (0) and transmitq (1). No offloads are offered (no
checksum, TSO or mergeable receive buffers): a frame is a whole Ethernet frame
after a 12-byte ``virtio_net_hdr`` (5.1.6: with VIRTIO_F_VERSION_1 the header
always has ``num_buffers``), and each receive chain must hold one whole frame
(Linux gives 1518 bytes and more without mergeable buffers).

Its backend (vmm/tap.py's Tap, or a test's) moves frames:

    fd            what the device's thread polls for frames to receive (``poll_fds``)
    recv()        one frame, or None when there is none now
    send(frame)   one frame out (dropped when the host cannot take it now)
    flush()       (optional) forget the frames waiting for the device: its reset

Receive: ``serve(RX)`` places frames into the driver's receive chains until
either runs out; a frame with no chain to go into is kept (one frame) and the
device is ``rx_starved`` until the driver adds buffers (its notify), so the
thread does not spin on a readable backend. A frame longer than its chain is
dropped and counted. Transmit: every available chain's bytes after the header
go out as one frame.
"""

from __future__ import annotations

import select
import struct

from osvmm.devices.virtio import spec
from osvmm.devices.virtio.queue import QueueError

RX, TX = 0, 1
QUEUE_MAX = 256
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1
HEADER_SIZE = 12  # struct virtio_net_hdr_v1 (5.1.6)
MAX_FRAME = 65535 + 14  # what a tap may hand over at most (no GSO offered: 1514 in practice)


class VirtioNet:
    device_id = spec.VIRTIO_ID_NET
    num_queues = 2
    queue_max = QUEUE_MAX

    def __init__(self, backend, memory, mac: bytes):
        if len(mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, not {len(mac)}")
        self.backend = backend
        self.memory = memory
        self.mac = mac
        self.features = spec.TRANSPORT_FEATURES | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
        self.config = mac + struct.pack("<H", VIRTIO_NET_S_LINK_UP)
        self.rx_starved = False
        self._held: bytes | None = None  # a received frame waiting for a chain
        self.counts = {"rx": 0, "tx": 0, "rx_dropped": 0, "tx_dropped": 0}

    def reset(self) -> None:
        self._held = None
        self.rx_starved = False
        flush = getattr(self.backend, "flush", None)  # a switch port's queued frames
        if flush is not None:
            flush()

    def state(self) -> dict:
        """What a snapshot holds of the model: the tap it was on, or the plan network
        its switch port belongs to (``network``; ``tap`` is then None), and its MAC
        (the backend's identity, attached again at a restore), and a received
        frame waiting for a receive buffer (with ``rx_starved``). Frames still in
        the tap's queue on the host are not the partition's: a restore on the
        same tap reads them, as a NIC would after a pause. A switch port's queue
        (``queued``: the frames the switch delivered to this NIC and the device
        has not yet taken) is the NIC's receive FIFO: held, and queued again at
        the restore; what is sent to the port while its partition is stopped is
        dropped, as on a wire whose station is down."""
        network = getattr(self.backend, "network", None)  # a switch port's (vmm/switch_port.py)
        st = {
            "kind": "net",
            "tap": getattr(self.backend, "name", None) if network is None else None,
            "mac": self.mac.hex(":"),
            "held": self._held,
            "rx_starved": self.rx_starved,
        }
        if network is not None:
            st["network"] = network.name
            st["queued"] = self.backend.pending()
        return st

    def restore(self, st: dict) -> None:
        held, queued = st["held"], st.get("queued") or []
        if held is not None and (not isinstance(held, bytes) or len(held) > MAX_FRAME):
            raise ValueError("a held frame that is no frame")
        if not isinstance(queued, list) or len(queued) > QUEUE_MAX:
            raise ValueError("queued frames that are no queue")
        if any(not isinstance(f, bytes) or len(f) > MAX_FRAME for f in queued):
            raise ValueError("a queued frame that is no frame")
        self._held = held
        self.rx_starved = bool(st["rx_starved"])
        if queued:
            self.backend.requeue(queued)  # a switch port's (a tap's state has none)

    def poll_fds(self) -> dict[int, int]:
        """The backend's fd while frames can go somewhere (vmm/virtio.py polls it)."""
        fd = self.backend.fd
        return {} if self.rx_starved or fd < 0 else {fd: select.POLLIN}

    def fd_ready(self, fd: int, revents: int) -> tuple[int, ...]:
        return (RX,)

    def serve(self, index: int, queue) -> bool:
        if index == TX:
            return self._transmit(queue)
        return self._receive(queue)

    def _transmit(self, queue) -> bool:
        pushed = False
        while (chain := queue.pop()) is not None:
            if chain.writable:
                raise QueueError(f"transmit chain {chain.head} has device-writable buffers")
            length = chain.readable_len
            if length < HEADER_SIZE or length > HEADER_SIZE + MAX_FRAME:
                self.counts["tx_dropped"] += 1
            else:
                frame = chain.read(self.memory, HEADER_SIZE, length - HEADER_SIZE)
                if self.backend.send(frame):
                    self.counts["tx"] += 1
                else:
                    self.counts["tx_dropped"] += 1
            queue.push(chain.head, 0)
            pushed = True
        return pushed and queue.needs_interrupt()

    def _receive(self, queue) -> bool:
        pushed = False
        self.rx_starved = False
        while True:
            frame = self._held if self._held is not None else self.backend.recv()
            self._held = None
            if frame is None:
                break
            chain = queue.pop()
            if chain is None:
                self._held = frame
                self.rx_starved = True
                break
            if chain.readable:
                raise QueueError(f"receive chain {chain.head} has device-readable buffers")
            if chain.writable_len < HEADER_SIZE + len(frame):
                self.counts["rx_dropped"] += 1
                queue.push(chain.head, 0)
            else:
                header = bytes(10) + struct.pack("<H", 1)  # num_buffers = 1
                chain.write(self.memory, 0, header)
                chain.write(self.memory, HEADER_SIZE, frame)
                queue.push(chain.head, HEADER_SIZE + len(frame))
                self.counts["rx"] += 1
            pushed = True
        return pushed and queue.needs_interrupt()
