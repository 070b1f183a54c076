"""A virtio-blk device's snapshot state without KVM: taken from a transport whose
queue is in the middle of use (requests answered, one made available and not yet
taken, an interrupt not acknowledged), through the state file's encoding, into a
fresh transport and model over the reopened image; the device goes on from the
right available index, raises the pending interrupt again, and refuses a disk
that is not the snapshot's. And the device thread's quiesce: stopped between two
requests, what was notified meanwhile served after."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from osvmm.devices.virtio import spec
from osvmm.devices.virtio.blk import VirtioBlk
from osvmm.devices.virtio.mmio import VirtioMmio
from osvmm.errors import SnapshotError
from osvmm.snapshot import format as fmt
from osvmm.vmm.blockfile import open_drive
from osvmm.vmm.snapshot import check_disks, snapshot_drives
from osvmm.vmm.virtio import VirtioDevices
from tests.test_virtio_mmio import Bus
from tests.virtio_driver import AVAIL, DATA, DESC, MEM_SIZE, USED, Driver, memory

SECTORS = 16
FEATURES = 1 << spec.VIRTIO_F_VERSION_1 | 1 << spec.VIRTIO_F_EVENT_IDX


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(512 * SECTORS))
    return path


def device(mem, path, readonly=False, notify=None):
    backend = open_drive(str(path), readonly)
    raised = []
    dev = VirtioMmio(VirtioBlk(backend, mem), mem, lambda: raised.append(1), notify)
    return dev, backend, raised


def ready(bus):
    """Linux's probe with event idx, queue 0 of 16 entries, DRIVER_OK."""
    bus.w(spec.STATUS, 0)
    bus.w(spec.STATUS, spec.ACKNOWLEDGE | spec.DRIVER)
    for sel in (0, 1):
        bus.w(spec.DRIVER_FEATURES_SEL, sel)
        bus.w(spec.DRIVER_FEATURES, FEATURES >> (32 * sel) & 0xFFFFFFFF)
    bus.w(spec.STATUS, spec.ACKNOWLEDGE | spec.DRIVER | spec.FEATURES_OK)
    bus.w(spec.QUEUE_SEL, 0)
    bus.w(spec.QUEUE_NUM, 16)
    for reg, addr in (
        (spec.QUEUE_DESC_LOW, DESC),
        (spec.QUEUE_DRIVER_LOW, AVAIL),
        (spec.QUEUE_DEVICE_LOW, USED),
    ):
        bus.w(reg, addr)
    bus.w(spec.QUEUE_READY, 1)
    bus.w(spec.STATUS, spec.ACKNOWLEDGE | spec.DRIVER | spec.FEATURES_OK | spec.DRIVER_OK)


def write_request(d: Driver, sector: int, data: bytes) -> int:
    """A write made available (not notified): the status byte's address."""
    status = d.buffer(b"\xee")
    head = d.avail_idx % 5 * 3  # three descriptors each, five chains in a table of 16
    segs = [
        (d.buffer(struct.pack("<IIQ", spec.VIRTIO_BLK_T_OUT, 0, sector)), 16, False),
        (d.buffer(data), len(data), False),
        (status, 1, True),
    ]
    d.make_available(d.chain(segs, first=head))
    return status


def copy_memory(mem):
    """Guest memory as a restore maps it: the same bytes, another mapping."""
    new = memory()
    new.write(0, mem.read(0, MEM_SIZE))
    return new


def test_a_queue_in_use_goes_on_from_the_right_index_after_a_restore(image):
    mem = memory()
    dev, backend, raised = device(mem, image)
    bus = Bus(dev)
    ready(bus)
    d = Driver(mem, 16)
    # Used index 7 and a driver 5 ahead of an old used_event: wrapping indices too.
    for i in range(7):
        st = write_request(d, i % SECTORS, bytes([i + 1]) * 512)
        d.set_used_event(d.avail_idx - 1)
        assert dev.process(0)
        assert mem.read(st, 1) == b"\0"
    d.take_used()
    assert len(raised) == 7 and bus.r(spec.INTERRUPT_STATUS) == spec.VIRTIO_MMIO_INT_VRING
    # One request made available, its notify still in an eventfd: not taken.
    pending = write_request(d, 9, b"\x99" * 512)
    state = fmt.decode(fmt.encode({"virtio": [dev.state()]}))["virtio"][0]
    assert state["queues"][0]["indices"] == {"last_avail": 7, "used_idx": 7, "signalled_used": 7}
    assert state["model"] == {
        "kind": "blk",
        "path": str(image),
        "readonly": False,
        "size": 512 * SECTORS,
    }
    before = image.read_bytes()
    backend.close()

    mem2 = copy_memory(mem)
    dev2, backend2, raised2 = device(mem2, image)
    try:
        dev2.restore(state, "virtio device 0")
        bus2 = Bus(dev2)
        for reg in (spec.STATUS, spec.INTERRUPT_STATUS, spec.QUEUE_READY, spec.QUEUE_NUM_MAX):
            assert bus2.r(reg) == bus.r(reg), reg
        assert dev2.driver_features == FEATURES
        assert image.read_bytes() == before  # nothing served by the restore itself
        d.mem = mem2
        d.set_used_event(d.avail_idx - 1)
        dev2.resume()  # served here: no device thread (notify None)
        # The pending interrupt raised again, and the request served, used entry 7.
        assert len(raised2) == 2
        assert mem2.read(pending, 1) == b"\0"
        assert d.used_idx() == 8 and [h for h, _ in d.take_used()] == [7 % 5 * 3]
        assert image.read_bytes()[9 * 512 : 10 * 512] == b"\x99" * 512
        # And the next one as usual.
        st = write_request(d, 10, b"\xaa" * 512)
        d.set_used_event(d.avail_idx - 1)
        assert dev2.process(0) and mem2.read(st, 1) == b"\0" and d.used_idx() == 9
        assert image.read_bytes()[10 * 512 : 11 * 512] == b"\xaa" * 512
        assert dev2.model.requests == 2
    finally:
        backend2.close()
        mem.close()
        mem2.close()


def test_no_interrupt_is_raised_again_when_the_driver_had_acknowledged_it(image):
    mem = memory()
    dev, backend, _ = device(mem, image)
    bus = Bus(dev)
    ready(bus)
    d = Driver(mem, 16)
    write_request(d, 0, b"\1" * 512)
    assert dev.process(0)
    bus.w(spec.INTERRUPT_ACK, bus.r(spec.INTERRUPT_STATUS))
    state = dev.state()
    backend.close()
    dev2, backend2, raised2 = device(mem, image)
    try:
        dev2.restore(state, "virtio device 0")
        dev2.resume()
        assert raised2 == [] and dev2.model.requests == 0  # nothing pending, nothing served
    finally:
        backend2.close()
        mem.close()


def test_a_device_before_the_driver_restores_as_it_was(image):
    mem = memory()
    dev, backend, _ = device(mem, image)
    state = dev.state()
    assert state["status"] == 0 and state["queues"][0]["indices"] is None
    backend.close()
    dev2, backend2, raised2 = device(mem, image)
    try:
        dev2.restore(state, "virtio device 0")
        dev2.resume()
        assert dev2.queues[0].vq is None and raised2 == []
    finally:
        backend2.close()
        mem.close()


def test_a_disk_that_is_not_the_snapshots_is_refused_in_one_line(image, tmp_path):
    mem = memory()
    dev, backend, _ = device(mem, image)
    ready(Bus(dev))
    state = {"virtio": [dev.state()]}
    backend.close()
    (drive,) = snapshot_drives(state)
    assert (drive.path, drive.readonly) == (str(image), False)

    bigger = tmp_path / "bigger.img"
    bigger.write_bytes(bytes(512 * (SECTORS + 1)))
    other = open_drive(str(bigger), False)
    try:
        with pytest.raises(SnapshotError) as err:
            check_disks(state, [other], "partition 'p'")
        text = str(err.value)
        assert text == (
            f"partition 'p': disk 0 {bigger}: {512 * (SECTORS + 1)} bytes, the snapshot's "
            f"disk ({image}) had {512 * SECTORS}: a restore needs the same disk"
        )
        # The transport refuses it too (its capacity is in the configuration space).
        dev2 = VirtioMmio(VirtioBlk(other, mem), mem, lambda: None)
        with pytest.raises(SnapshotError, match="configuration space differs"):
            dev2.restore(state["virtio"][0], "virtio device 0")
    finally:
        other.close()
    ro = open_drive(str(image), True)
    try:
        with pytest.raises(SnapshotError, match="the snapshot's disk was writable"):
            check_disks(state, [ro], "partition 'p'")
    finally:
        ro.close()
    with pytest.raises(SnapshotError, match="has 1 disks, 0 given"):
        check_disks(state, [], "partition 'p'")
    # Another path with the same size and mode is the same disk, moved.
    copy = tmp_path / "copy.img"
    copy.write_bytes(image.read_bytes())
    moved = open_drive(str(copy), False)
    try:
        check_disks(state, [moved], "partition 'p'")
    finally:
        moved.close()
        mem.close()


class FakeVm:
    """What DeviceThread asks of a VM: irqfd and ioeventfd, here remembered only."""

    fd = 3

    def __init__(self):
        self.calls = []

    def irqfd(self, fd, gsi, deassign=False):
        self.calls.append(("irqfd", gsi, deassign))

    def ioeventfd(self, fd, addr, length, datamatch=None, deassign=False):
        self.calls.append(("ioeventfd", addr, deassign))


class FakeMmioBus:
    def register(self, base, size, dev):
        pass


def test_quiesce_stops_the_thread_between_requests_and_serves_what_came_meanwhile(image):
    mem = memory()
    errors = []
    devices = VirtioDevices()
    try:
        dev = devices.add_blk(
            FakeVm(), mem, FakeMmioBus(), open_drive(str(image), False), errors.append
        )
        bus = Bus(dev.transport)
        ready(bus)
        d = Driver(mem, 16)
        d.set_used_event(0xFFFF)  # no interrupts wanted: only the used ring is looked at
        devices.start("p")
        thread = dev.thread
        write_request(d, 0, b"\1" * 512)
        bus.w(spec.QUEUE_NOTIFY, 0)  # a notify of the bus (no ioeventfd here)
        deadline = time.monotonic() + 10
        while d.used_idx() != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with devices.quiesced():
            assert dev.thread is None and not thread.is_alive()
            write_request(d, 1, b"\2" * 512)
            bus.w(spec.QUEUE_NOTIFY, 0)
            time.sleep(0.1)
            assert d.used_idx() == 1  # nobody serves while quiesced
            (state,) = devices.state()
            assert state["queues"][0]["indices"]["last_avail"] == 1
        assert dev.thread is not None and dev.thread.name == thread.name
        while d.used_idx() != 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert image.read_bytes()[512:1024] == b"\2" * 512 and errors == []
        assert threading.active_count() >= 1
    finally:
        devices.close()
        mem.close()


# -- virtio-net on a tap ------------------------------------------------------------------------

MAC = bytes.fromhex("026f73010203")


def test_a_nics_held_frame_and_its_identity_come_back():
    from osvmm.devices.virtio.net import HEADER_SIZE, RX, VirtioNet
    from osvmm.devices.virtio.queue import Virtqueue
    from osvmm.vmm.snapshot import snapshot_nets
    from tests.test_virtio_net import FakeBackend

    mem = memory()
    try:
        backend = FakeBackend()
        backend.name = "tap7"
        model = VirtioNet(backend, mem, MAC)
        rxq = Virtqueue(mem, 8, DESC, AVAIL, USED)
        backend.inbox.append(b"\xab" * 60)
        assert model.serve(RX, rxq) is False and model.rx_starved  # no buffer: held
        state = fmt.decode(fmt.encode({"m": model.state()}))["m"]
        assert state == {
            "kind": "net",
            "tap": "tap7",
            "mac": "02:6f:73:01:02:03",
            "held": b"\xab" * 60,
            "rx_starved": True,
        }
        assert snapshot_nets({"virtio": [{"model": state}]})[0].mac == MAC

        again = VirtioNet(FakeBackend(), mem, MAC)
        again.restore(state)
        assert again.rx_starved and again.poll_fds() == {}
        d = Driver(mem, 8)
        d.make_available(d.chain([(d.buffer(2048), 2048, True)]))
        assert again.serve(RX, rxq) is True and not again.rx_starved
        ((head, written),) = d.take_used()
        assert written == HEADER_SIZE + 60
        assert mem.read(DATA + HEADER_SIZE, 60) == b"\xab" * 60
        with pytest.raises(ValueError, match="no frame"):
            again.restore(state | {"held": bytes(70000)})
    finally:
        mem.close()


def test_nics_that_are_not_the_snapshots_are_refused_in_one_line():
    from osvmm.vmm.snapshot import check_nics

    state = {"virtio": [{"model": {"kind": "net", "tap": "t0", "mac": MAC.hex(":")}}]}
    check_nics(state, [MAC], "partition 'p'")  # another tap, the same MAC: fine
    other = bytes.fromhex("026f73aabbcc")
    with pytest.raises(SnapshotError) as err:
        check_nics(state, [other], "partition 'p'")
    assert str(err.value) == (
        "partition 'p': NIC 0: MAC 02:6f:73:aa:bb:cc, the snapshot's (tap t0) had "
        "02:6f:73:01:02:03: give mac=02:6f:73:01:02:03"
    )
    with pytest.raises(SnapshotError, match="the snapshot has 1 NICs, 0 given"):
        check_nics(state, [], "partition 'p'")


# -- virtio-vsock: connections reset, as Firecracker ------------------------------------------


def test_a_restored_vsock_sends_transport_reset_on_the_event_queue():
    from osvmm.devices.virtio.queue import Virtqueue
    from osvmm.devices.virtio.vsock import EVENT, VirtioVsock
    from tests.test_virtio_vsock import CID, FakeBackend, Guest, connected

    mem = memory(4 << 20)
    try:
        backend = FakeBackend()
        backend.path = "/run/v.sock"
        model = VirtioVsock(backend, mem, CID)
        guest = Guest(mem, model)
        guest.give_rx()
        connected(model, backend, guest)
        state = fmt.decode(fmt.encode({"m": model.state()}))["m"]
        assert state == {"kind": "vsock", "uds": "/run/v.sock", "cid": CID, "connections": 1}

        again = VirtioVsock(FakeBackend(), mem, CID)
        again.restore(state)
        assert again.conns == {} and again.reset_owed
        evd = Driver(mem, 4, desc=0x7000, avail=0x8000, used=0x9000)
        evq = Virtqueue(mem, 4, 0x7000, 0x8000, 0x9000)
        assert again.serve(EVENT, evq) is False and again.reset_owed  # no buffer yet
        event = 0x300000
        mem.write(event, b"\xff" * 4)
        evd.make_available(evd.chain([(event, 4, True)]))
        assert again.serve(EVENT, evq) is True and not again.reset_owed
        assert evd.take_used() == [(0, 4)]
        assert mem.read(event, 4) == b"\0\0\0\0"  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
        evd.make_available(evd.chain([(event, 4, True)], first=1))
        assert again.serve(EVENT, evq) is False and evd.take_used() == []  # once only
        with pytest.raises(ValueError, match="CID"):
            again.restore(state | {"cid": CID + 1})
    finally:
        mem.close()


def test_a_vsock_that_is_not_the_snapshots_is_refused_in_one_line():
    from osvmm.plan.drives import Vsock
    from osvmm.vmm.snapshot import check_vsock, snapshot_vsock

    state = {"virtio": [{"model": {"kind": "vsock", "uds": "/a", "cid": 5, "connections": 0}}]}
    assert snapshot_vsock(state) == Vsock("/a", 5) and snapshot_vsock({}) is None
    check_vsock(state, Vsock("/b", 5), "partition 'p'")  # another socket: fine
    for vsock, message in (
        (Vsock("/a", 6), "partition 'p': vsock cid 6, the snapshot's had cid 5"),
        (None, "partition 'p': the snapshot has a vsock, none given"),
    ):
        with pytest.raises(SnapshotError) as err:
            check_vsock(state, vsock, "partition 'p'")
        assert str(err.value) == message
    with pytest.raises(SnapshotError, match="the snapshot has no vsock, one given"):
        check_vsock({}, Vsock("/a", 5), "partition 'p'")


# -- virtio-net on a plan's network -------------------------------------------------------------

LAN_MAC = bytes.fromhex("026e01020304")


def test_a_network_nics_state_holds_its_network_and_mac_not_the_switch():
    from osvmm.devices.virtio.net import HEADER_SIZE, RX, VirtioNet
    from osvmm.devices.virtio.queue import Virtqueue
    from osvmm.vmm.snapshot import snapshot_nets, snapshot_networks
    from osvmm.vmm.switch_port import SwitchNetwork

    mem, net = memory(), SwitchNetwork("lan")
    try:
        port, peer = net.add_port(), net.add_port()
        model = VirtioNet(port, mem, LAN_MAC)
        frame = LAN_MAC + bytes.fromhex("026e0a0b0c0d") + b"\x88\xb5" + bytes(46)
        peer.send(b"\xff" * 6 + frame[6:])  # the switch learns the peer
        peer.send(frame)  # flooded (the port's MAC is unknown): queued at the port
        rxq = Virtqueue(mem, 8, DESC, AVAIL, USED)
        assert model.serve(RX, rxq) is False and model.rx_starved  # no buffer: one held
        state = fmt.decode(fmt.encode({"m": model.state()}))["m"]
        assert state == {
            "kind": "net",
            "tap": None,
            "network": "lan",
            "mac": "02:6e:01:02:03:04",
            "held": b"\xff" * 6 + frame[6:],
            "rx_starved": True,
            "queued": [frame],  # the port's queue: the NIC's receive FIFO
        }
        assert len(port.queue) == 1  # read, not taken
        whole = {"virtio": [{"model": state}]}
        assert snapshot_networks(whole) == (("lan", LAN_MAC),)
        assert snapshot_nets(whole) == ()  # not a tap NIC: nothing for osvmm run to attach

        # Restored onto a port of a new switch (no table): held, then queued, then
        # what came since the port was attached; the switch's table is not restored.
        again_net = SwitchNetwork("lan")
        try:
            new_port, new_peer = again_net.add_port(), again_net.add_port()
            later = LAN_MAC + frame[6:12] + b"\x88\xb5" + b"\x01" * 46
            new_peer.send(later)  # flooded: the new switch knows no one
            again = VirtioNet(new_port, mem, LAN_MAC)
            again.restore(state)
            assert not again_net.switch.table or LAN_MAC not in again_net.switch.table
            assert again.poll_fds() == {}  # starved until the driver adds buffers
            d = Driver(mem, 8)
            for i in range(3):
                d.make_available(d.chain([(d.buffer(2048), 2048, True)], first=i))
            assert again.serve(RX, rxq) is True and not again.rx_starved
            got = [mem.read(DATA + i * 2048 + HEADER_SIZE, 60) for i in range(3)]
            assert got == [b"\xff" * 6 + frame[6:], frame, later], got
        finally:
            again_net.close()
        with pytest.raises(ValueError, match="no frame"):
            again.restore(state | {"queued": [bytes(70000)]})
        with pytest.raises(ValueError, match="no queue"):
            again.restore(state | {"queued": [b""] * 257})
    finally:
        net.close()
        mem.close()


def test_network_nics_that_are_not_the_snapshots_are_refused_in_one_line():
    from osvmm.vmm.snapshot import check_networks, check_nics

    other = bytes.fromhex("026eaabbccdd")
    state = {
        "virtio": [
            {"model": {"kind": "blk"}},
            {"model": {"kind": "net", "tap": None, "network": "lan", "mac": LAN_MAC.hex(":")}},
            {"model": {"kind": "net", "tap": None, "network": "san", "mac": other.hex(":")}},
        ]
    }
    check_networks(state, [("lan", LAN_MAC), ("san", other)], "restore")
    check_nics(state, [], "restore")  # no tap NIC among them
    cases = [
        (
            [],
            "restore: the snapshot's NICs are on networks lan, san; this plan puts the "
            "partition on none",
        ),
        ([("lan", LAN_MAC)], "restore: the snapshot's NICs are on networks lan, san; this plan"),
        ([("san", other), ("lan", LAN_MAC)], "on networks lan, san; this plan puts the partition "),
        ([("lan", LAN_MAC), ("wan", other)], "this plan puts the partition on lan, wan"),
        (
            [("lan", other), ("san", other)],
            "restore: NIC on network 'lan': MAC 02:6e:aa:bb:cc:dd, the snapshot's had "
            "02:6e:01:02:03:04 (a plan's MAC is its network's and partition's: restore it as "
            "the partition it was)",
        ),
    ]
    for nics, message in cases:
        with pytest.raises(SnapshotError) as err:
            check_networks(state, nics, "restore")
        assert message in str(err.value) and "\n" not in str(err.value), nics
        assert err.value.exit_status == 2
    tap = {"virtio": [{"model": {"kind": "net", "tap": "t0", "mac": MAC.hex(":")}}]}
    with pytest.raises(SnapshotError, match="the snapshot's NICs are on networks none; this plan"):
        check_networks(tap, [("lan", LAN_MAC)], "restore")
