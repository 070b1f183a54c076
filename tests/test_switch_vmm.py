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
