"""virtio-net end to end under KVM, without the rig: two bundled ``virtionet``
guests on a plan's ``[[network]]`` under ``osvmm up``, as a user runs them. Each
drives its NIC at CPL0 (probe, features, its MAC from the configuration space,
receive and transmit queues); the sender sends numbered frames of a pattern with
a checksum to the receiver's MAC through the VMM's switch, the receiver checks
each. A frame to a MAC on no member is flooded and ignored by the receiver; a
frame over 1514 bytes is dropped by the switch, and ``osvmm stat`` counts both."""

from __future__ import annotations

import json
import os
import re

import pytest

from osvmm.plan.config import network_mac
from tests.helpers import tap_in_netns
from tests.test_supervisor_up import UpProcess

pytestmark = pytest.mark.kvm

COUNT = 32


def plan(count: int) -> str:
    text = ""
    for name, cmdline in (("rx", "rate=1"), ("tx", f"send=1 count={count}")):
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
            timeout=150,
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
    assert re.search(rf"virtionet: {COUNT} frames in \d+ us, \d+ frames/s\n", rx), rx  # rate=1
    assert "FAIL" not in rx + tx


def test_osvmm_stat_counts_the_frames_and_the_switchs_drops(up):
    r = up.cli("stat", "--json")
    assert r.returncode == 0, r.stderr
    stats = {s["name"]: s for s in json.loads(r.stdout)["partitions"]}
    (rx,), (tx,) = stats["rx"]["devices"], stats["tx"]["devices"]
    assert rx["name"] == "virtio-net lan.0" and tx["name"] == "virtio-net lan.1"
    # rx: every DATA frame, the flooded one and END, and the PROBE when it was up to
    # hear it (it answered with a second HELLO); else tx heard its first HELLO.
    probe = rx["counts"]["tx"] - 1
    assert probe in (0, 1) and rx["counts"]["rx"] == COUNT + 2 + probe, rx
    # tx: the frame over 1514 bytes is the switch's to drop: the NIC sent it.
    assert (tx["counts"]["tx"], tx["counts"]["tx_dropped"]) == (COUNT + 3, 1)
    assert tx["backend"]["switch_dropped"] == 1
    assert tx["backend"]["switch_flooded"] == 2  # the PROBE and the unknown MAC's
    assert rx["backend"]["switch_dropped"] == 0 and rx["backend"]["switch_flooded"] == 1
    assert rx["counts"]["rx_dropped"] == 0 and rx["backend"]["queue_full"] == 0
    text = up.cli("stat", "tx").stdout.decode()
    assert re.search(r"device 0 virtio-net lan\.1: .*switch_dropped 1, switch_flooded 2;", text)


def test_a_third_member_gets_no_frame_for_a_learned_mac():
    """A watcher on the same network sees the broadcasts and the flooded frame for
    an unknown MAC, and none of the DATA frames: the switch learned where their
    destination is."""
    text = plan(16).replace('cmdline = "send=1 count=16"', 'cmdline = "send=1 count=16 watchers=1"')
    text += (
        '[[partition]]\nname = "obs"\ncpus = "floating"\nmemory = "8M"\n'
        'image = "guests:virtionet"\ncmdline = "watch=1"\nrestart = "stop"\n'
    )
    text = text.replace('members = ["rx", "tx"]', 'members = ["rx", "tx", "obs"]')
    up = UpProcess(text)
    try:
        names = ("rx", "tx", "obs")
        up.wait_for(
            lambda p: all(p[n]["state"] == "stopped" and p[n]["boots"] == 1 for n in names),
            timeout=150,
        )
        logs = {n: (up.logs / f"{n}.console.log").read_text() for n in names}
        assert "virtionet: received 16 frames ok\n" in logs["rx"], logs
        assert logs["obs"].splitlines()[:3] == [
            f"virtionet: mac {mac('obs')}",
            "virtionet: watched 0 DATA frames",
            "virtionet: ignored 1 frames for other MACs",  # the unknown MAC's, flooded
        ], logs
        r = up.cli("stat", "tx", "--json")
        assert r.returncode == 0, r.stderr
        ((tx,),) = (s["devices"] for s in json.loads(r.stdout)["partitions"])
        assert tx["backend"]["switch_flooded"] == 3  # PROBE, the unknown MAC's, BYE
    finally:
        up.close()


# --- one partition on a host tap, the host's end in a network namespace -------------

TAP = f"osvmmn{os.getpid() % 10**8}"  # per process: another run of this file may be on
NETNS = f"osvmm-netguest-{os.getpid()}"
HOST_IP, GUEST_IP = "10.98.0.1", "10.98.0.2"
ETHERTYPE = 0x88B5


def pattern_frame(dst: bytes, src: bytes, kind: bytes, seq: int, length: int) -> bytes:
    """A frame as the virtionet guest builds it (osvmm/guests/src/virtionet.c)."""
    data = bytes((seq * 13 + i * 7 + 1) & 0xFF for i in range(length))
    checksum = 0
    for b in data:
        checksum = (checksum * 33 + b) & 0xFFFFFFFF
    frame = dst + src + ETHERTYPE.to_bytes(2, "big") + kind + seq.to_bytes(4, "little")
    frame += length.to_bytes(2, "little") + data + checksum.to_bytes(4, "little")
    return frame.ljust(60, b"\0")


def host_peer(tap: str, count: int) -> None:
    """The host's end, run inside the namespace: wait for the guest's HELLO on the
    tap, then send it ``count`` frames, one for another MAC and END, as the
    virtionet sender does. Prints the tap's MAC and the guest's."""
    import socket

    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    s.bind((tap, 0))
    s.settimeout(60)
    mine = s.getsockname()[4]
    print("tap", mine.hex(":"), flush=True)
    while True:
        frame, addr = s.recvfrom(2048)
        if addr[2] != socket.PACKET_OUTGOING and frame[14:15] == b"H":
            break
    guest = frame[6:12]
    print("hello from", guest.hex(":"), flush=True)
    for seq in range(count):
        s.send(pattern_frame(guest, mine, b"D", seq, 40 + (seq * 97) % 1400))
    s.send(pattern_frame(b"\x02\0\0\0\0\x01", mine, b"X", 0, 0))
    s.send(pattern_frame(guest, mine, b"E", count, 0))
    print("sent", count, flush=True)


def ip_number(dotted: str) -> str:
    return hex(int.from_bytes(bytes(int(x) for x in dotted.split(".")), "big"))


@pytest.fixture
def netns():
    """A network namespace with a persistent tap, up, holding the host's address:
    nothing of the test reaches the machine's own network."""
    with tap_in_netns(NETNS, TAP, f"{HOST_IP}/24") as inside:
        yield inside


def test_a_guest_on_a_tap_is_answered_by_the_host_and_receives_its_frames(netns):
    import subprocess
    import sys

    from osvmm.vmm.tap import default_mac
    from tests.helpers import REPO, run_osvmm

    code = f"from tests.test_virtio_net_guest import host_peer; host_peer({TAP!r}, 16)"
    peer = subprocess.Popen(
        [*netns, sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(REPO),
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        first = peer.stdout.readline().decode()  # bound: the guest's HELLO cannot pass it by
        append = f"ip={ip_number(GUEST_IP)} arp={ip_number(HOST_IP)} count=16"
        r = run_osvmm(
            "run", "guests:virtionet", "--net", f"tap={TAP}", "--append", append, prefix=netns
        )
        host_out, host_err = peer.communicate(timeout=30)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
    out, host = r.stdout.decode(), first + host_out.decode()
    assert r.returncode == 1, (out, r.stderr.decode(), host, host_err.decode())
    guest_mac = ":".join(f"{b:02x}" for b in default_mac(TAP))
    tap_mac = host.split()[1]
    assert out.splitlines() == [
        f"virtionet: mac {guest_mac}",
        f"virtionet: arp {HOST_IP} is at {tap_mac}",  # the host kernel answered
        "virtionet: received 16 frames ok",
        "virtionet: ignored 1 frames for other MACs",
    ], (out, host)
    assert f"hello from {guest_mac}\n" in host  # the host read the guest's frame
