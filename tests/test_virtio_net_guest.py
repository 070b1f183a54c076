"""virtio-net end to end under KVM, without the rig: two bundled ``virtionet``
guests on a plan's ``[[network]]`` under ``osvmm up``, as a user runs them. Each
drives its NIC at CPL0 (probe, features, its MAC from the configuration space,
receive and transmit queues); the sender sends numbered frames of a pattern with
a checksum to the receiver's MAC through the VMM's switch, the receiver checks
each. A frame to a MAC on no member is flooded and ignored by the receiver; a
frame over 1514 bytes is dropped by the switch, and ``osvmm stat`` counts both."""

from __future__ import annotations

import json
import re

import pytest

from osvmm.plan.config import network_mac
from tests.test_supervisor_up import UpProcess

pytestmark = pytest.mark.kvm

COUNT = 32


def plan(count: int) -> str:
    text = ""
    for name, cmdline in (("rx", ""), ("tx", f"send=1 count={count}")):
        text += (
            f'[[partition]]\nname = "{name}"\ncpus = "floating"\nmemory = "8M"\n'
            f'image = "guests:virtionet"\ncmdline = "{cmdline}"\nrestart = "stop"\n'
        )
    return text + '[[network]]\nname = "lan"\nmembers = ["rx", "tx"]\n'


def mac(name: str) -> str:
    return ":".join(f"{b:02x}" for b in network_mac("lan", name))


@pytest.fixture(scope="module")
def up():
    up = UpProcess(plan(COUNT))
    try:
        up.wait_for(
            lambda p: all(p[n]["state"] == "stopped" and p[n]["boots"] == 1 for n in ("rx", "tx")),
            timeout=90,
        )
        yield up
    finally:
        up.close()


def test_the_receiver_gets_every_frame_the_sender_sent(up):
    parts = up.ps()
    rx = (up.logs / "rx.console.log").read_text()
    tx = (up.logs / "tx.console.log").read_text()
    assert parts["rx"]["reason"] == parts["tx"]["reason"] == "debug exit with value 0", rx + tx
    assert f"virtionet: mac {mac('rx')}\n" in rx
    assert f"virtionet: mac {mac('tx')}\n" in tx
    assert f"virtionet: sent {COUNT} frames to {mac('rx')}\n" in tx
    assert f"virtionet: received {COUNT} frames ok\n" in rx
    assert "virtionet: ignored 1 frames for other MACs\n" in rx  # the unknown MAC's, flooded
    assert "FAIL" not in rx + tx


def test_osvmm_stat_counts_the_frames_and_the_switchs_drops(up):
    r = up.cli("stat", "--json")
    assert r.returncode == 0, r.stderr
    stats = {s["name"]: s for s in json.loads(r.stdout)["partitions"]}
    (rx,), (tx,) = stats["rx"]["devices"], stats["tx"]["devices"]
    assert rx["name"] == "virtio-net lan.0" and tx["name"] == "virtio-net lan.1"
    # rx: every DATA frame, the PROBE, the flooded one and END; it sent two HELLOs.
    assert (rx["counts"]["rx"], rx["counts"]["tx"]) == (COUNT + 3, 2)
    # tx: the frame over 1514 bytes is the switch's to drop: the NIC sent it.
    assert (tx["counts"]["tx"], tx["counts"]["tx_dropped"]) == (COUNT + 3, 1)
    assert tx["backend"]["switch_dropped"] == 1
    assert tx["backend"]["switch_flooded"] == 2  # the PROBE and the unknown MAC's
    assert rx["backend"]["switch_dropped"] == 0 and rx["backend"]["switch_flooded"] == 1
    assert rx["counts"]["rx_dropped"] == 0 and rx["backend"]["queue_full"] == 0
    text = up.cli("stat", "tx").stdout.decode()
    assert re.search(r"device 0 virtio-net lan\.1: .*switch_dropped 1, switch_flooded 2;", text)
