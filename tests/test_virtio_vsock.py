"""virtio-vsock's model against guest memory the test lays out and a fake backend:
connections both ways, data both ways, credit that stalls and resumes, shutdown
and RST, and malformed packets from the guest (dropped or answered with RST,
counted, never a crash)."""

from __future__ import annotations

import select
import struct

import pytest

from osvmm.devices.virtio import spec
from osvmm.devices.virtio.queue import Virtqueue
from osvmm.devices.virtio.vsock import (
    BUF_ALLOC,
    FIRST_HOST_PORT,
    HDR_SIZE,
    MAX_ORPHANS,
    MAX_PAYLOAD,
    RX,
    TX,
    VirtioVsock,
    virtio_vsock_hdr,
)
from tests.virtio_driver import Driver, memory

CID = 3
OP = {
    "REQUEST": spec.VIRTIO_VSOCK_OP_REQUEST,
    "RESPONSE": spec.VIRTIO_VSOCK_OP_RESPONSE,
    "RST": spec.VIRTIO_VSOCK_OP_RST,
    "SHUTDOWN": spec.VIRTIO_VSOCK_OP_SHUTDOWN,
    "RW": spec.VIRTIO_VSOCK_OP_RW,
    "CREDIT_UPDATE": spec.VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    "CREDIT_REQUEST": spec.VIRTIO_VSOCK_OP_CREDIT_REQUEST,
}
NAME = {v: k for k, v in OP.items()}
RX_BUF = 4096 + HDR_SIZE  # what Linux gives: a header and a 4 KiB buffer


class FakeEndpoint:
    def __init__(self, fd: int):
        self.fd = fd
        self.inbox = bytearray()  # what the host sends
        self.eof = False
        self.sent = bytearray()  # what reached the host
        self.room = 1 << 30  # how much more the host takes now
        self.broken = False
        self.ok_port = None
        self.shut = False
        self.closed = False

    def recv(self, n):
        if self.broken:
            raise ConnectionResetError
        if self.inbox:
            data = bytes(self.inbox[:n])
            del self.inbox[:n]
            return data
        return b"" if self.eof else None

    def send(self, data):
        if self.broken:
            raise BrokenPipeError
        n = min(len(data), self.room)
        self.room -= n
        self.sent += data[:n]
        return n

    def established(self, port):
        self.ok_port = port

    def shutdown_write(self):
        self.shut = True

    def close(self):
        self.closed = True


class FakeBackend:
    LISTEN_FD = 100

    def __init__(self):
        self.listeners: set[int] = set()  # host ports a guest may connect to
        self.incoming: list = []  # (guest port, endpoint) the next ready() hands over
        self.made: list[FakeEndpoint] = []
        self.next_fd = 200

    def listen_fds(self):
        return [self.LISTEN_FD]

    def ready(self, fd, revents):
        out, self.incoming = self.incoming, []
        return out

    def endpoint(self) -> FakeEndpoint:
        ep = FakeEndpoint(self.next_fd)
        self.next_fd += 1
        self.made.append(ep)
        return ep

    def connect(self, port):
        return self.endpoint() if port in self.listeners else None


class Guest:
    """The guest's driver: an rx queue kept full of 4 KiB buffers, a tx queue."""

    def __init__(self, mem, model, rx_size=16):
        self.mem, self.model = mem, model
        self.rxd = Driver(mem, rx_size, desc=0x1000, avail=0x2000, used=0x3000)
        self.rxq = Virtqueue(mem, rx_size, 0x1000, 0x2000, 0x3000)
        self.txd = Driver(mem, 8, desc=0x4000, avail=0x5000, used=0x6000)
        self.txq = Virtqueue(mem, 8, 0x4000, 0x5000, 0x6000)
        self.rx_bufs = {}
        for head in range(rx_size):
            self.rx_bufs[head] = 0x100000 + head * 0x2000
        self.tx_data = 0x200000
        self.out: set[int] = set()  # rx heads the device holds

    def give_rx(self, heads=None, size=RX_BUF):
        """The rx buffers the device does not hold (or ``heads``) made available."""
        for head in [h for h in self.rx_bufs if h not in self.out] if heads is None else heads:
            self.rxd.chain([(self.rx_bufs[head], size, True)], first=head)
            self.rxd.make_available(head)
            self.out.add(head)

    def packets(self):
        """What the device put in the rx buffers since the last call: (hdr, payload)."""
        self.model.serve(RX, self.rxq)
        out = []
        for head, written in self.rxd.take_used():
            self.out.discard(head)
            raw = self.mem.read(self.rx_bufs[head], written)
            if written < HDR_SIZE:
                out.append((None, raw))
                continue
            hdr = virtio_vsock_hdr.from_buffer_copy(raw[:HDR_SIZE])
            assert hdr.len == written - HDR_SIZE
            out.append((hdr, raw[HDR_SIZE:]))
        return out

    def send(self, op, src_port=1234, dst_port=80, payload=b"", **fields):
        values = dict(
            src_cid=CID,
            dst_cid=2,
            src_port=src_port,
            dst_port=dst_port,
            len=len(payload),
            type=spec.VIRTIO_VSOCK_TYPE_STREAM,
            op=OP[op] if isinstance(op, str) else op,
            buf_alloc=BUF_ALLOC,
            fwd_cnt=0,
        )
        values.update(fields)
        raw = bytes(virtio_vsock_hdr(**values)) + payload
        self.send_raw([(raw, False)])

    def send_raw(self, pieces):
        segments = []
        at = self.tx_data
        for data, writable in pieces:
            self.mem.write(at, data)
            segments.append((at, len(data), writable))
            at += (len(data) + 15) & ~15 or 16
        self.txd.make_available(self.txd.chain(segments))
        self.model.serve(TX, self.txq)
        assert [h for h, _ in self.txd.take_used()] == [0]


@pytest.fixture
def dev():
    mem = memory(4 << 20)
    backend = FakeBackend()
    model = VirtioVsock(backend, mem, CID)
    guest = Guest(mem, model)
    guest.give_rx()
    yield model, backend, guest
    mem.close()


def kinds(packets):
    return [NAME[h.op] for h, _ in packets]


def connected(model, backend, guest, guest_port=1234, port=80, buf_alloc=BUF_ALLOC):
    """A guest-initiated connection, established; its endpoint."""
    backend.listeners.add(port)
    guest.send("REQUEST", guest_port, port, buf_alloc=buf_alloc)
    (hdr, _), *_ = guest.packets()
    assert NAME[hdr.op] == "RESPONSE"
    return backend.made[-1]


def test_config_and_features(dev):
    model, _, _ = dev
    assert model.device_id == 19 and model.num_queues == 3
    assert model.config == struct.pack("<Q", CID)
    assert model.features >> spec.VIRTIO_F_VERSION_1 & 1
    assert model.features >> spec.VIRTIO_F_EVENT_IDX & 1
    assert model.features >> spec.VIRTIO_F_INDIRECT_DESC & 1


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFFFFFF, 1 << 32])
def test_reserved_cids_are_refused(cid):
    with pytest.raises(ValueError):
        VirtioVsock(FakeBackend(), None, cid)


def test_guest_connects_and_data_flows_both_ways(dev):
    model, backend, guest = dev
    backend.listeners.add(80)
    guest.send("REQUEST", 1234, 80)
    [(hdr, payload)] = guest.packets()
    assert NAME[hdr.op] == "RESPONSE" and payload == b""
    assert (hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port) == (2, CID, 80, 1234)
    assert hdr.type == spec.VIRTIO_VSOCK_TYPE_STREAM and hdr.buf_alloc == BUF_ALLOC
    ep = backend.made[0]
    guest.send("RW", payload=b"hello host")
    assert ep.sent == b"hello host"
    assert select.POLLIN & model.poll_fds()[ep.fd]
    ep.inbox += b"hello guest"
    assert model.fd_ready(ep.fd, select.POLLIN) == (RX,)
    [(hdr, payload)] = guest.packets()
    assert NAME[hdr.op] == "RW" and payload == b"hello guest"
    assert hdr.fwd_cnt == len(b"hello host")  # our credit rides on every packet


def test_guest_connect_to_no_listener_is_refused(dev):
    model, _, guest = dev
    guest.send("REQUEST", 1234, 81)
    [(hdr, _)] = guest.packets()
    assert NAME[hdr.op] == "RST" and (hdr.src_port, hdr.dst_port) == (81, 1234)
    assert model.counts["refused"] == 1 and not model.conns


def test_host_connects_and_the_guest_accepts(dev):
    model, backend, guest = dev
    ep = backend.endpoint()
    ep.inbox += b"first bytes"
    backend.incoming.append((52, ep))
    assert model.fd_ready(FakeBackend.LISTEN_FD, select.POLLIN) == (RX,)
    [(hdr, _)] = guest.packets()
    assert NAME[hdr.op] == "REQUEST"
    assert (hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port) == (2, CID, FIRST_HOST_PORT, 52)
    assert ep.fd not in model.poll_fds()  # nothing read before the guest accepts
    guest.send("RESPONSE", 52, FIRST_HOST_PORT)
    assert ep.ok_port == FIRST_HOST_PORT
    [(hdr, payload)] = guest.packets()
    assert NAME[hdr.op] == "RW" and payload == b"first bytes"


def test_host_connect_refused_by_the_guest_closes_the_stream(dev):
    model, backend, guest = dev
    ep = backend.endpoint()
    backend.incoming.append((52, ep))
    model.fd_ready(FakeBackend.LISTEN_FD, select.POLLIN)
    assert kinds(guest.packets()) == ["REQUEST"]
    guest.send("RST", 52, FIRST_HOST_PORT)
    assert ep.closed and ep.ok_port is None and not model.conns
    assert guest.packets() == []  # no answer to an RST


def test_a_second_host_connection_gets_another_port(dev):
    model, backend, guest = dev
    backend.incoming += [(52, backend.endpoint()), (52, backend.endpoint())]
    model.fd_ready(FakeBackend.LISTEN_FD, select.POLLIN)
    ports = [h.src_port for h, _ in guest.packets()]
    assert ports == [FIRST_HOST_PORT, FIRST_HOST_PORT + 1]


def test_host_data_waits_for_the_guests_credit(dev):
    model, backend, guest = dev
    ep = connected(model, backend, guest, buf_alloc=100)
    ep.inbox += bytes(range(250))
    model.fd_ready(ep.fd, select.POLLIN)
    [(hdr, payload)] = guest.packets()
    assert payload == bytes(range(100))
    assert ep.fd not in model.poll_fds()  # no credit: the host is not read
    assert guest.packets() == []
    guest.send("CREDIT_UPDATE", buf_alloc=100, fwd_cnt=60)  # the guest read 60
    assert model.poll_fds()[ep.fd] & select.POLLIN
    model.fd_ready(ep.fd, select.POLLIN)
    [(hdr, payload)] = guest.packets()
    assert payload == bytes(range(100, 160))
    guest.send("CREDIT_UPDATE", buf_alloc=1000, fwd_cnt=160)  # a bigger buffer
    model.fd_ready(ep.fd, select.POLLIN)
    [(hdr, payload)] = guest.packets()
    assert payload == bytes(range(160, 250))


def test_rw_larger_than_an_rx_buffer_is_split(dev):
    model, backend, guest = dev
    ep = connected(model, backend, guest)
    ep.inbox += bytes(10000)
    model.fd_ready(ep.fd, select.POLLIN)
    sizes = [len(p) for _, p in guest.packets()]
    assert sizes == [4096, 4096, 1808]


def test_a_host_that_does_not_read_stalls_the_guest_then_resumes(dev):
    model, backend, guest = dev
    ep = connected(model, backend, guest)
    ep.room = 0
    chunk = bytes(MAX_PAYLOAD)
    for _ in range(BUF_ALLOC // MAX_PAYLOAD):  # the whole credit we gave
        guest.send("RW", payload=chunk)
    assert ep.sent == b"" and model.poll_fds()[ep.fd] & select.POLLOUT
    assert guest.packets() == []
    ep.room = 1 << 30
    model.fd_ready(ep.fd, select.POLLOUT)
    assert len(ep.sent) == BUF_ALLOC
    [(hdr, _)] = guest.packets()  # the guest hears it may send again
    assert NAME[hdr.op] == "CREDIT_UPDATE" and hdr.fwd_cnt == BUF_ALLOC
    guest.send("RW", payload=b"more")
    assert ep.sent.endswith(b"more")


def test_a_guest_beyond_its_credit_is_reset(dev):
    model, backend, guest = dev
    ep = connected(model, backend, guest)
    ep.room = 0
    for _ in range(BUF_ALLOC // MAX_PAYLOAD):
        guest.send("RW", payload=bytes(MAX_PAYLOAD))
    guest.send("RW", payload=b"x")
    assert kinds(guest.packets()) == ["RST"]
    assert ep.closed and not model.conns and model.counts["malformed"] == 1


def test_credit_request_is_answered(dev):
    model, backend, guest = dev
    connected(model, backend, guest)
    guest.send("RW", payload=b"abc")
    guest.send("CREDIT_REQUEST")
    [(hdr, _)] = guest.packets()
    assert NAME[hdr.op] == "CREDIT_UPDATE" and hdr.fwd_cnt == 3


def test_guest_shutdown_send_shuts_the_host_stream_after_its_data(dev):
    model, backend, guest = dev
    ep = connected(model, backend, guest)
    ep.room = 2
    guest.send("RW", payload=b"tail")
    guest.send("SHUTDOWN", flags=spec.VIRTIO_VSOCK_SHUTDOWN_SEND)
    assert ep.sent == b"ta" and not ep.shut
    ep.room = 100
    model.fd_ready(ep.fd, select.POLLOUT)
    assert ep.sent == b"tail" and ep.shut and not ep.closed
    ep.inbox += b"reply"  # the other direction goes on
    model.fd_ready(ep.fd, select.POLLIN)
    assert [p for _, p in guest.packets()] == [b"reply"]


def test_guest_close_is_answered_with_rst(dev):
    model, backend, guest = dev
    ep = connected(model, backend, guest)
    both = spec.VIRTIO_VSOCK_SHUTDOWN_SEND | spec.VIRTIO_VSOCK_SHUTDOWN_RCV
    guest.send("RW", payload=b"last words")
    guest.send("SHUTDOWN", flags=both)
    assert kinds(guest.packets()) == ["RST"]
    assert ep.sent == b"last words" and ep.closed and not model.conns


def test_host_eof_is_a_half_close_after_its_data(dev):
    model, backend, guest = dev
    ep = connected(model, backend, guest)
    ep.inbox += b"bye"
    ep.eof = True
    model.fd_ready(ep.fd, select.POLLIN)
    model.fd_ready(ep.fd, select.POLLIN | select.POLLHUP)
    packets = guest.packets()
    assert kinds(packets) == ["RW", "SHUTDOWN"] and packets[0][1] == b"bye"
    assert packets[1][0].flags == spec.VIRTIO_VSOCK_SHUTDOWN_SEND
    assert ep.fd not in model.poll_fds()  # nothing more to read from the host
    guest.send("RW", payload=b"the answer")  # the other way goes on
    assert ep.sent == b"the answer"
    both = spec.VIRTIO_VSOCK_SHUTDOWN_SEND | spec.VIRTIO_VSOCK_SHUTDOWN_RCV
    guest.send("SHUTDOWN", flags=both)
    assert kinds(guest.packets()) == ["RST"]
    assert ep.closed and not model.conns


def test_a_broken_host_stream_resets_the_connection(dev):
    model, backend, guest = dev
    ep = connected(model, backend, guest)
    ep.broken = True
    guest.send("RW", payload=b"lost")
    assert kinds(guest.packets()) == ["RST"]
    assert ep.closed and not model.conns


def test_reset_closes_every_stream(dev):
    model, backend, guest = dev
    ep = connected(model, backend, guest)
    model.reset()
    assert ep.closed and not model.conns and not model.by_fd


# -- what a guest can get wrong -----------------------------------------------------------


def test_short_and_overlong_packets_are_dropped(dev):
    model, backend, guest = dev
    guest.send_raw([(bytes(10), False)])
    hdr = virtio_vsock_hdr(src_cid=CID, dst_cid=2, len=100, op=OP["RW"], type=1)
    guest.send_raw([(bytes(hdr) + bytes(20), False)])  # len beyond the chain
    hdr.len = MAX_PAYLOAD + 1
    guest.send_raw([(bytes(hdr) + bytes(MAX_PAYLOAD + 1), False)])
    guest.send_raw([(bytes(HDR_SIZE), False), (bytes(16), True)])  # writable buffer
    assert model.counts["malformed"] == 4 and guest.packets() == []


def test_wrong_cids_are_dropped(dev):
    model, backend, guest = dev
    backend.listeners.add(80)
    guest.send("REQUEST", src_cid=4)
    guest.send("REQUEST", dst_cid=5)
    guest.send("REQUEST", src_cid=CID | 1 << 32)
    assert model.counts["bad_cid"] == 3 and guest.packets() == [] and not backend.made


@pytest.mark.parametrize(
    "op, fields",
    [(99, {}), (0, {}), ("REQUEST", {"type": 2}), ("RW", {}), ("SHUTDOWN", {})],
    ids=["unknown op", "invalid op", "seqpacket", "rw without connection", "shutdown without"],
)
def test_bad_packets_are_answered_with_rst(dev, op, fields):
    model, backend, guest = dev
    backend.listeners.add(80)
    guest.send(op, 1234, 80, **fields)
    [(hdr, _)] = guest.packets()
    assert NAME[hdr.op] == "RST" and (hdr.src_port, hdr.dst_port) == (80, 1234)
    assert not model.conns


def test_payload_on_a_control_packet_resets_the_connection(dev):
    model, backend, guest = dev
    ep = connected(model, backend, guest)
    guest.send("CREDIT_UPDATE", payload=b"junk")
    assert kinds(guest.packets()) == ["RST"] and ep.closed


def test_request_on_an_open_connection_resets_it(dev):
    model, backend, guest = dev
    ep = connected(model, backend, guest)
    guest.send("REQUEST")
    assert kinds(guest.packets()) == ["RST"] and ep.closed and not model.conns


def test_rst_for_nothing_gets_no_answer(dev):
    model, _, guest = dev
    guest.send("RST")
    assert guest.packets() == []


def test_a_flood_of_bad_packets_is_bounded(dev):
    model, _, guest = dev
    for i in range(MAX_ORPHANS + 10):
        hdr = virtio_vsock_hdr(src_cid=CID, dst_cid=2, src_port=i, op=OP["RW"], type=1)
        guest.txd.make_available(guest.txd.chain([(guest.tx_data, HDR_SIZE, False)]))
        guest.mem.write(guest.tx_data, bytes(hdr))
        model.serve(TX, guest.txq)
        guest.txd.take_used()
    assert len(model.orphans) == MAX_ORPHANS and model.counts["dropped"] == 10


def test_rx_buffers_too_small_for_a_header_are_returned_empty():
    mem = memory(4 << 20)
    backend = FakeBackend()
    model = VirtioVsock(backend, mem, CID)
    guest = Guest(mem, model, rx_size=4)
    guest.give_rx(size=20)
    backend.listeners.add(80)
    guest.send("REQUEST")
    assert guest.packets() == [(None, b"")] * 4
    assert model.counts["rx_short"] == 4
    guest.give_rx()
    assert kinds(guest.packets()) == ["RESPONSE"]
    mem.close()


def test_random_packets_never_break_the_device():
    """Headers of random fields (mostly plausible ones), random lengths, short chains:
    every packet is taken and answered or dropped; the device keeps its bounds."""
    import random

    rng = random.Random(19)
    mem = memory(4 << 20)
    backend = FakeBackend()
    backend.listeners.update({80, 81})
    model = VirtioVsock(backend, mem, CID)
    guest = Guest(mem, model)
    for _ in range(600):
        fields = dict(
            src_cid=rng.choice([CID, CID, CID, 2, 1 << 40]),
            dst_cid=rng.choice([2, 2, 2, CID]),
            src_port=rng.choice([1, 2, 3]),
            dst_port=rng.choice([80, 81, 82, FIRST_HOST_PORT]),
            type=rng.choice([1, 1, 1, 2, 0]),
            op=rng.randrange(9),
            flags=rng.randrange(4),
            buf_alloc=rng.choice([0, 10, BUF_ALLOC, 0xFFFFFFFF]),
            fwd_cnt=rng.randrange(1 << 32),
        )
        payload = bytes(rng.choice([0, 0, 5, 5000]))
        fields["len"] = rng.choice([len(payload)] * 3 + [len(payload) + 1, 0xFFFFFFFF])
        raw = bytes(virtio_vsock_hdr(**fields)) + payload
        if rng.random() < 0.1:
            raw = raw[: rng.randrange(HDR_SIZE)]
        if rng.random() < 0.2:
            ep = backend.endpoint()
            ep.inbox += bytes(rng.randrange(3000))
            ep.eof = rng.random() < 0.5
            backend.incoming.append((rng.choice([1, 2, 3]), ep))
            model.fd_ready(FakeBackend.LISTEN_FD, select.POLLIN)
        guest.send_raw([(raw, False)])
        for fd, events in model.poll_fds().items():
            model.fd_ready(fd, events)
        if rng.random() < 0.5:
            guest.give_rx()
            guest.packets()
        assert len(model.conns) <= 256 and len(model.orphans) <= MAX_ORPHANS
        assert all(len(c.to_guest) <= 64 << 10 for c in model.conns.values())
        assert all(len(c.to_host) <= BUF_ALLOC for c in model.conns.values())
    assert model.counts["malformed"] and model.counts["bad_cid"] and model.counts["rx"]
    mem.close()
