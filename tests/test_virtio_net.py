"""virtio-net's model against guest memory the test lays out and a fake backend:
transmit, receive, a frame held while the driver has no buffer, drops, malformed
chains; the tap backend's checks."""

from __future__ import annotations

import struct

import pytest

from osvmm.devices.virtio import spec
from osvmm.devices.virtio.net import HEADER_SIZE, RX, TX, VirtioNet
from osvmm.devices.virtio.queue import QueueError, Virtqueue
from osvmm.errors import ConfigError
from tests.virtio_driver import Driver, memory

MAC = bytes.fromhex("026f73010203")


class FakeBackend:
    fd = -1

    def __init__(self):
        self.inbox: list[bytes] = []
        self.sent: list[bytes] = []
        self.full = False

    def recv(self):
        return self.inbox.pop(0) if self.inbox else None

    def send(self, frame):
        if self.full:
            return False
        self.sent.append(frame)
        return True


@pytest.fixture
def net():
    mem = memory()
    backend = FakeBackend()
    model = VirtioNet(backend, mem, MAC)
    rxd = Driver(mem, 8, desc=0x1000, avail=0x2000, used=0x3000)
    txd = Driver(mem, 8, desc=0x4000, avail=0x5000, used=0x6000)
    txd.data_at = 0x80000
    rxq = Virtqueue(mem, 8, 0x1000, 0x2000, 0x3000)
    txq = Virtqueue(mem, 8, 0x4000, 0x5000, 0x6000)
    yield model, backend, mem, (rxd, rxq), (txd, txq)
    mem.close()


def test_config_and_features(net):
    model = net[0]
    assert model.config == MAC + struct.pack("<H", 1)  # mac, status: link up
    assert model.features >> spec.VIRTIO_F_VERSION_1 & 1
    assert model.features >> 5 & 1 and model.features >> 16 & 1  # MAC, STATUS
    assert not model.features >> 15 & 1  # no mergeable receive buffers
    assert not model.features & 1  # no checksum offload


def test_transmit_strips_the_header(net):
    model, backend, mem, _, (d, q) = net
    frame = bytes(range(60))
    hdr = d.buffer(HEADER_SIZE)
    body = d.buffer(frame)
    d.make_available(d.chain([(hdr, HEADER_SIZE, False), (body, 60, False)]))
    assert model.serve(TX, q)
    assert backend.sent == [frame]
    assert d.take_used() == [(0, 0)]
    assert model.counts["tx"] == 1


def test_transmit_drops_short_chains_and_a_full_host(net):
    model, backend, mem, _, (d, q) = net
    d.make_available(d.chain([(d.buffer(4), 4, False)]))
    backend.full = True
    d.make_available(d.chain([(d.buffer(HEADER_SIZE + 20), HEADER_SIZE + 20, False)], first=2))
    model.serve(TX, q)
    assert backend.sent == [] and model.counts["tx_dropped"] == 2
    assert [h for h, _ in d.take_used()] == [0, 2]  # both returned to the driver


def test_a_writable_transmit_buffer_breaks_the_queue(net):
    model, _, _, _, (d, q) = net
    d.make_available(d.chain([(d.buffer(20), 20, False), (d.buffer(4), 4, True)]))
    with pytest.raises(QueueError, match="transmit chain"):
        model.serve(TX, q)


def test_receive_fills_a_chain_with_header_and_frame(net):
    model, backend, mem, (d, q), _ = net
    buf = d.buffer(1526)
    d.make_available(d.chain([(buf, 1526, True)]))
    frame = b"\xff" * 6 + MAC + b"\x08\x00" + b"payload"
    backend.inbox.append(frame)
    assert model.serve(RX, q)
    ((head, written),) = d.take_used()
    assert written == HEADER_SIZE + len(frame)
    assert mem.read(buf, HEADER_SIZE) == bytes(10) + b"\x01\x00"  # num_buffers 1
    assert mem.read(buf + HEADER_SIZE, len(frame)) == frame


def test_a_frame_waits_for_a_buffer_and_the_device_says_it_starves(net):
    model, backend, mem, (d, q), _ = net
    backend.inbox += [b"first frame", b"second frame"]
    assert not model.serve(RX, q)
    assert model.rx_starved and backend.inbox == [b"second frame"]  # one taken, held
    a, b = d.buffer(64), d.buffer(64)
    d.make_available(d.chain([(a, 64, True)]))
    d.make_available(d.chain([(b, 64, True)], first=1))
    assert model.serve(RX, q)
    assert not model.rx_starved
    assert mem.read(a + HEADER_SIZE, 11) == b"first frame"
    assert mem.read(b + HEADER_SIZE, 12) == b"second frame"
    model.reset()
    assert not model.rx_starved and model._held is None


def test_a_frame_longer_than_its_chain_is_dropped(net):
    model, backend, mem, (d, q), _ = net
    d.make_available(d.chain([(d.buffer(20), 20, True)]))
    backend.inbox.append(b"x" * 100)
    model.serve(RX, q)
    assert d.take_used() == [(0, 0)] and model.counts["rx_dropped"] == 1


def test_a_readable_receive_buffer_breaks_the_queue(net):
    model, backend, _, (d, q), _ = net
    d.make_available(d.chain([(d.buffer(20), 20, False), (d.buffer(64), 64, True)]))
    backend.inbox.append(b"frame")
    with pytest.raises(QueueError, match="receive chain"):
        model.serve(RX, q)


def test_a_mac_must_be_six_bytes():
    with pytest.raises(ValueError):
        VirtioNet(FakeBackend(), memory(), b"\x02")


@pytest.mark.parametrize(
    ("name", "why"),
    [("", "not an interface name"), ("x" * 16, "not an interface name"), ("a/b", "not an")],
)
def test_tap_names_are_checked(name, why):
    from osvmm.vmm.tap import open_tap

    with pytest.raises(ConfigError, match=why):
        open_tap(name)


def test_default_mac_is_local_unicast_and_stable():
    from osvmm.vmm.tap import default_mac

    mac = default_mac("tap0")
    assert len(mac) == 6 and mac[0] == 0x02 and mac == default_mac("tap0")
    assert mac != default_mac("tap1")


def test_a_tap_flush_drops_what_the_host_queued_and_a_reset_flushes():
    """A device reset (the driver's, or a partition kept built recycled for its next
    boot) starts from an empty tap queue, as a tap attached anew does."""
    import socket

    from osvmm.vmm.tap import Tap

    host, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)  # one read, one frame
    ours.setblocking(False)
    tap = Tap(ours.detach(), "t0")
    try:
        for i in range(3):
            host.send(bytes([i]) * 60)
        tap.flush()
        assert tap.recv() is None
        host.send(b"\x07" * 60)
        model = VirtioNet(tap, memory(), b"\x02\0\0\0\0\x01")
        model.reset()
        assert tap.recv() is None
        host.send(b"\x08" * 60)
        assert tap.recv() == b"\x08" * 60
    finally:
        tap.close()
        host.close()
