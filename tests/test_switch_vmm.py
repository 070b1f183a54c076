"""Partitions built with NICs on a switch (PartitionConfig.switch_nics): the ports
are attached while the partition is built, detached when it closes, and the
same port serves a rebuilt partition (needs /dev/kvm)."""

from __future__ import annotations

import pytest

from osvmm.guests.build import guest_path
from osvmm.machine import Machine
from osvmm.plan.config import network_mac
from osvmm.vmm.partition import Partition, PartitionConfig
from osvmm.vmm.switch_port import SwitchNetwork

pytestmark = pytest.mark.kvm

BCAST = b"\xff" * 6


def build(port, name: str) -> Partition:
    config = PartitionConfig(
        Machine.build(8 << 20, 1, virtio_mmio=1),
        name=name,
        image=str(guest_path("hello")),
        console=lambda data: None,
        switch_nics=((port, network_mac("lan", name)),),
        reusable=True,
    )
    return Partition(config).build()


def test_a_member_is_attached_while_built_and_back_on_its_port_after():
    net = SwitchNetwork("lan")
    a, other = net.add_port(), net.add_port()
    try:
        part = build(a, "a")
        try:
            model = part.virtio.devices[0].transport.model
            assert model.backend is a and model.mac == network_mac("lan", "a")
            part.start()
            result = part.wait(30)
            assert result is not None and result.fault is None, result
            other.send(BCAST + bytes(6) + b"\x08\x00" + bytes(46))
            assert a.counts["down"] == 0
            part.recycle()
            assert not a.queue  # the reset forgot it
        finally:
            part.close()
        assert not a.attached
        other.send(BCAST + bytes(6) + b"\x08\x00" + bytes(46))
        assert a.counts["down"] == 1 and not a.queue
        again = build(a, "a")
        try:
            assert a.attached
        finally:
            again.close()
    finally:
        net.close()


def test_the_supervisor_owns_one_switch_per_network_across_boots(tmp_path):
    import time

    from osvmm.plan.config import parse_plan
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology
    from osvmm.up.supervisor import STOPPED, Supervisor

    text = f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n'
    for name in ("a", "b"):
        text += (
            f'[[partition]]\nname = "{name}"\ncpus = "floating"\nmemory = "8M"\n'
            'image = "guests:hello"\n'
        )
    text += '[[network]]\nname = "lan"\nmembers = ["a", "b"]\n'
    plan = parse_plan(text, tmp_path)
    sup = Supervisor(place(plan, read_topology()), log_dir=str(tmp_path / "logs"))
    built: list[Partition] = []
    sup.on_build.append(lambda entry, part: built.append(part))
    entry = sup.partitions["a"]
    network = sup.networks["lan"]
    try:
        assert [p.number for p in network.ports] == [0, 1]
        for _ in range(2):
            sup.start("a")
            deadline = time.monotonic() + 20
            while entry.state != STOPPED or entry.ready is None:
                assert time.monotonic() < deadline, entry.state
                time.sleep(0.02)
        assert len(built) == 2 and sup.networks["lan"] is network
        for part in built:
            model = part.virtio.devices[0].transport.model if part.virtio else None
            assert model is None or model.backend is network.port(0)
        assert built[0].config.switch_nics[0] == (network.port(0), network_mac("lan", "a"))
    finally:
        sup.close()
    assert network.port(0).fd == -1  # closed with the supervisor
