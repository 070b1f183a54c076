"""Snapshots under the ``osvmm up`` supervisor, in process (needs /dev/kvm): a
partition beside the one being snapshotted does not notice, and a partition with
a channel attached gets it mapped again, with its memory, when it is restored."""

from __future__ import annotations

import hashlib
import struct
import threading
import time

import pytest

from osvmm.hypercall import abi
from osvmm.kvm.exits import Interrupted
from osvmm.plan.config import parse_plan
from osvmm.plan.placement import place
from osvmm.plan.topology import read_topology
from osvmm.up.hypercalls import serve_supervisor
from osvmm.up.snapshots import SnapshotService
from osvmm.up.supervisor import RUNNING, STOPPED, Supervisor

pytestmark = pytest.mark.kvm

COUNTER_ADDR = 0x200000
PATTERN_ADDR, PATTERN_SIZE = 0x201000, 0x10000

PLAN = """
[[partition]]
name = "quiet"
cpus = "floating"
memory = "8M"
image = "guests:counter"

[[partition]]
name = "busy"
cpus = "floating"
memory = "8M"
image = "guests:counter"
{restore}

[[channel]]
name = "link"
size = "64K"
members = {{ quiet = "ro", busy = "rw" }}
"""


class Up:
    def __init__(self, tmp_path, restore: str = ""):
        body = f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n' + PLAN.format(restore=restore)
        self.sup = Supervisor(place(parse_plan(body, tmp_path), read_topology()))
        self.live = serve_supervisor(self.sup, check=True)
        self.snapshots = SnapshotService(self.sup, self.live)
        self.sup.start_all()
        deadline = time.monotonic() + 30
        while any(e.state != RUNNING for e in self.sup.partitions.values()):
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def part(self, name):
        return self.sup.partitions[name].partition

    def count(self, name) -> int:
        return struct.unpack("<Q", self.part(name).read_guest(COUNTER_ADDR, 8))[0]

    def close(self):
        self.sup.close()
        self.live.close()


def test_the_partition_beside_does_not_notice(tmp_path):
    up = Up(tmp_path)
    try:
        deadline = time.monotonic() + 30
        while up.count("quiet") == 0 or up.count("busy") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        quiet_vcpu = up.part("quiet").threads[0]
        kicks = quiet_vcpu.handled[Interrupted]
        samples, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                samples.append(up.count("quiet"))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        time.sleep(0.2)
        for i in range(3):
            answer = up.snapshots.snapshot({"name": "busy", "dir": str(tmp_path / f"s{i}")})
            assert answer["state"] == RUNNING
        time.sleep(0.2)
        stop.set()
        sampler.join()
        assert quiet_vcpu.handled[Interrupted] == kicks  # never kicked out of KVM_RUN
        pattern = up.part("quiet").read_guest(PATTERN_ADDR, PATTERN_SIZE)
        assert up.sup.partitions["quiet"].state == RUNNING
        assert up.sup.partitions["busy"].state == RUNNING
    finally:
        up.close()
    # It counted all along (on a loaded host a sample may find it not yet scheduled
    # again; the kicks above show that the VMM never held it).
    assert len(samples) >= 6 and samples[-1] > samples[0]
    assert all(b >= a for a, b in zip(samples, samples[1:], strict=False)), samples
    assert (
        hashlib.sha256(pattern).digest()
        == hashlib.sha256(bytes((i * 7 + 1) & 0xFF for i in range(PATTERN_SIZE))).digest()
    )


def test_an_attached_channel_is_mapped_again_with_its_memory(tmp_path):
    snap = tmp_path / "snap"
    up = Up(tmp_path)
    try:
        busy = up.sup.partitions["busy"]
        link = up.live.topology.channels[0]
        # As the guest would: CHANNEL_ATTACH (channel 0, writable) from the busy partition.
        assert up.live.call(busy.index, abi.CHANNEL_ATTACH, (0, 0, 0, 0)) == link.gpa
        up.live.channels[0].write(0, b"what the channel held")
        answer = up.snapshots.snapshot({"name": "busy", "dir": str(snap), "stop": True})
        assert answer["state"] == STOPPED
        assert busy.reason == f"stopped after a snapshot to {snap}"
        assert up.sup.partitions["quiet"].state == RUNNING
        assert (snap / "image-channel-link").exists()
    finally:
        up.close()

    up = Up(tmp_path, restore=f'restore = "{snap}"')
    try:
        busy = up.sup.partitions["busy"]
        part = up.part("busy")
        assert part.boot_log == (f"resumed the snapshot in {snap}",)
        assert part.shared_mappings() == {link.gpa: link.size}
        held = up.live.state.attachment(busy.index, 0)
        assert held is not None and held.writable
        assert up.live.channels[0].read(0, 21) == b"what the channel held"
        assert up.live.violations == []  # memslots and attachments agree
        at = up.count("busy")
        deadline = time.monotonic() + 20
        while up.count("busy") <= at:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # A restart boots the image afresh: nothing attached.
        assert up.sup.restart("busy") == RUNNING
        assert up.part("busy").shared_mappings() == {}
        assert up.part("busy").boot_log != (f"resumed the snapshot in {snap}",)
    finally:
        up.close()
