"""The switch-port backend (vmm/switch_port.py): two and three virtio-net devices
over guest memory the test lays out (as tests/test_virtio_net.py), frames
between them through the switch, a full queue dropping and counting."""

from __future__ import annotations

import os

import pytest

from osvmm.devices.virtio.net import HEADER_SIZE, RX, TX, VirtioNet
from osvmm.devices.virtio.queue import Virtqueue
from osvmm.vmm.switch_port import SwitchNetwork
from tests.virtio_driver import Driver, memory

MACS = [bytes([0x02, 0x6F, 0x73, 0, 0, n]) for n in range(3)]
BCAST = b"\xff" * 6


class Nic:
    """A device with its own memory and queues, as a partition's."""

    def __init__(self, port, mac):
        self.mem = memory()
        self.port = port
        self.model = VirtioNet(port, self.mem, mac)
        self.rxd = Driver(self.mem, 8, desc=0x1000, avail=0x2000, used=0x3000)
        self.txd = Driver(self.mem, 8, desc=0x4000, avail=0x5000, used=0x6000)
        self.txd.data_at = 0x80000
        self.rxq = Virtqueue(self.mem, 8, 0x1000, 0x2000, 0x3000)
        self.txq = Virtqueue(self.mem, 8, 0x4000, 0x5000, 0x6000)
        self.tx_next = 0
        self.rx_next = 0
        self.rx_bufs: dict[int, int] = {}  # head: buffer, given and not yet used

    def transmit(self, frame: bytes) -> None:
        d = self.txd
        hdr, body = d.buffer(HEADER_SIZE), d.buffer(frame)
        d.make_available(
            d.chain([(hdr, HEADER_SIZE, False), (body, len(frame), False)], first=self.tx_next)
        )
        self.tx_next = (self.tx_next + 2) % 8
        self.model.serve(TX, self.txq)

    def give_buffers(self, n: int) -> None:
        for _ in range(n):
            buf = self.rxd.buffer(1526)
            head = self.rxd.chain([(buf, 1526, True)], first=self.rx_next)
            self.rxd.make_available(head)
            self.rx_next = (self.rx_next + 1) % 8
            self.rx_bufs[head] = buf

    def receive(self) -> list[bytes]:
        if len(self.rx_bufs) < 4:
            self.give_buffers(4 - len(self.rx_bufs))
        self.model.serve(RX, self.rxq)
        out = []
        for head, n in self.rxd.take_used():
            out.append(self.mem.read(self.rx_bufs.pop(head) + HEADER_SIZE, n - HEADER_SIZE))
        return out


def readable(fd: int) -> bool:
    try:
        value = os.eventfd_read(fd)
    except BlockingIOError:
        return False
    os.eventfd_write(fd, value)
    return True


@pytest.fixture
def lan():
    net = SwitchNetwork("lan", depth=2)
    nics = [Nic(net.add_port(), mac) for mac in MACS]
    yield net, nics
    net.close()
    for nic in nics:
        nic.mem.close()


def frame(dst: bytes, src: bytes, payload: bytes = b"hello") -> bytes:
    return dst + src + b"\x08\x00" + payload


def test_broadcast_reaches_the_others_then_unicast_only_its_station(lan):
    net, (a, b, c) = lan
    a.transmit(frame(BCAST, MACS[0]))
    assert readable(b.port.fd) and readable(c.port.fd) and not readable(a.port.fd)
    assert b.receive() == [frame(BCAST, MACS[0])]
    assert c.receive() == [frame(BCAST, MACS[0])]
    assert not readable(b.port.fd)  # drained: no longer polled as readable
    b.transmit(frame(MACS[0], MACS[1], b"reply"))  # A is known: to A only
    assert a.receive() == [frame(MACS[0], MACS[1], b"reply")]
    assert c.receive() == []
    assert a.model.counts["tx"] == 1 and b.model.counts["rx"] == 1


def test_a_full_queue_drops_and_counts_without_blocking_the_sender(lan):
    net, (a, b, c) = lan
    for i in range(5):
        a.transmit(frame(BCAST, MACS[0], bytes([i])))
    assert a.model.counts["tx"] == 5 and a.model.counts["tx_dropped"] == 0
    assert b.port.counts["queue_full"] == 3  # depth 2
    assert b.receive() == [frame(BCAST, MACS[0], b"\x00"), frame(BCAST, MACS[0], b"\x01")]


def test_a_runt_frame_is_dropped_by_the_switch(lan):
    net, (a, b, c) = lan
    a.transmit(b"short")
    assert a.model.counts["tx_dropped"] == 1
    assert net.switch.ports[0].counts["dropped"] == 1
    assert b.receive() == []


def test_a_ports_stat_counts_add_the_switchs_drops_and_floods_of_its_frames(lan):
    net, (a, b, c) = lan
    a.transmit(b"short")  # dropped by the switch
    a.transmit(frame(BCAST, MACS[0]))  # flooded
    a.transmit(frame(MACS[2], MACS[0]))  # unknown unicast: flooded
    c.transmit(frame(MACS[0], MACS[2]))  # a is known: not flooded
    a.transmit(frame(b"\x02" + bytes(5), MACS[0], bytes(1501)))  # 1515 bytes: dropped
    assert a.port.stat_counts() == {
        "queue_full": 0,
        "down": 0,
        "switch_dropped": 2,
        "switch_flooded": 2,
    }
    assert c.port.stat_counts()["switch_flooded"] == 0
    assert b.port.stat_counts() == dict.fromkeys(a.port.stat_counts(), 0)  # b sent nothing


def test_a_port_survives_its_device_and_keeps_the_table(lan):
    net, (a, b, c) = lan
    a.transmit(frame(BCAST, MACS[0]))
    b.port.close()  # b's partition stops: its queue goes
    assert not readable(b.port.fd) and not b.port.queue
    c.transmit(frame(BCAST, MACS[2]))  # to a member that is down: dropped, counted
    assert not b.port.queue and b.port.counts["down"] == 1
    net.port(1).attach()
    again = Nic(net.port(1), MACS[1])  # and restarts on the same port
    c.transmit(frame(MACS[0], MACS[2]))
    assert again.receive() == []
    assert a.receive() == [frame(BCAST, MACS[2]), frame(MACS[0], MACS[2])]
    c.transmit(frame(BCAST, MACS[2]))
    assert again.receive() == [frame(BCAST, MACS[2])]
    again.mem.close()


def test_a_device_reset_forgets_the_queued_frames(lan):
    net, (a, b, c) = lan
    a.transmit(frame(BCAST, MACS[0]))
    b.model.reset()  # the driver resets it, or the partition is recycled
    assert not b.port.queue and not readable(b.port.fd)
    assert b.port.attached


def test_two_networks_do_not_meet():
    one, two = SwitchNetwork("one"), SwitchNetwork("two")
    p1, q1 = one.add_port(), one.add_port()
    p2 = two.add_port()
    p1.send(frame(BCAST, MACS[0]))
    assert q1.recv() == frame(BCAST, MACS[0]) and p2.recv() is None
    one.close()
    two.close()


def test_up_gives_each_member_a_nic_on_its_port():
    from pathlib import Path

    from osvmm.plan.config import parse_plan
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology
    from osvmm.up.partition_config import machine_of, partition_config
    from osvmm.vmm.switch_port import build_networks

    root = Path(__file__).resolve().parents[1]
    text = "".join(
        f'[[partition]]\nname = "{n}"\ncpus = "floating"\nvcpus = 1\n'
        f'memory = "2M"\nimage = "guests:hello"\n'
        for n in ("a", "b", "c")
    )
    text += '[[network]]\nname = "lan"\nmembers = ["b", "a"]\n'
    plan = parse_plan(text, root)
    assignment = place(plan, read_topology(str(root / "tests/fixtures/sysfs/epyc-2s128t")))
    networks = build_networks(plan.networks)
    try:
        configs = {}
        for p in assignment.partitions:
            machine = machine_of(assignment, p)
            assert machine.virtio_mmio == (0 if p.name == "c" else 1)
            configs[p.name] = partition_config(
                assignment, p, machine, lambda data: None, networks=networks
            )
        ((port_a, mac_a),) = configs["a"].switch_nics
        ((port_b, mac_b),) = configs["b"].switch_nics
        assert configs["c"].switch_nics == ()
        assert port_b is networks["lan"].port(0) and port_a is networks["lan"].port(1)
        assert mac_a == plan.networks[0].mac("a") and mac_a != mac_b
        again = partition_config(  # a restart: the same port
            assignment,
            assignment.partition("a"),
            machine_of(assignment, assignment.partition("a")),
            lambda data: None,
            networks=networks,
        )
        assert again.switch_nics[0][0] is port_a
    finally:
        for network in networks.values():
            network.close()
