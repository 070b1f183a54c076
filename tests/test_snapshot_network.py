"""Snapshots of a partition on a plan's ``[[network]]``, end to end under the
``osvmm up`` supervisor in process (needs /dev/kvm), with two bundled
``virtionet`` guests exchanging frames through the VMM's switch: the sender
snapshotted mid-run with ``stop`` and resumed under the same supervisor (the
receiver gets every frame, in order, as if the sender had paused); the
receiver snapshotted while it waits and resumed by a plan's ``restore`` under a
new supervisor, whose new switch learns it again; and every refusal of such a
snapshot (a plan without its network, another partition's MAC, ``osvmm run
--restore``) in one line, before anything is built."""

from __future__ import annotations

import time

import pytest

from osvmm.errors import ConfigError
from osvmm.plan.config import network_mac, parse_plan
from osvmm.plan.placement import place
from osvmm.plan.topology import read_topology
from osvmm.up.hypercalls import serve_supervisor
from osvmm.up.snapshots import SnapshotService
from osvmm.up.supervisor import RUNNING, STOPPED, Supervisor
from osvmm.vmm.snapshot import Snapshot

pytestmark = pytest.mark.kvm

# DATA frames of 200 bytes, a few seconds of sending here. With the frames that
# follow them (END among them) they fit in the receiver's port queue (256), so
# however far the receiver falls behind, the switch drops none of them.
COUNT = 250


def partition(name: str, cmdline: str, restore: str = "", length: str = "len=200") -> str:
    return (
        f'[[partition]]\nname = "{name}"\ncpus = "floating"\nmemory = "8M"\n'
        f'image = "guests:virtionet"\ncmdline = "{cmdline} {length} budget=900"\n'
        f'restart = "stop"\n{restore}'
    )


def plan(rx_restore: str = "", network: str = "lan", rx: str = "rx", length="len=200") -> str:
    """``length``: the DATA frames' (the guest's default, 40-1439 bytes: slower)."""
    return (
        partition(rx, "", rx_restore, length)
        + partition("tx", f"send=1 count={COUNT}", length=length)
        + f'[[network]]\nname = "{network}"\nmembers = ["{rx}", "tx"]\n'
    )


def mac(name: str) -> str:
    return network_mac("lan", name).hex(":")


class Up:
    """A supervisor with the hypercall monitor and the snapshot service, as ``osvmm
    up`` makes them; ``start``: which partitions to boot now."""

    def __init__(self, tmp_path, body: str, start=("rx", "tx")):
        self.logs = tmp_path / "logs"
        text = f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n' + body
        self.sup = Supervisor(
            place(parse_plan(text, tmp_path), read_topology()), log_dir=str(self.logs)
        )
        self.live = serve_supervisor(self.sup, check=True)
        self.snapshots = SnapshotService(self.sup, self.live)
        for name in start:
            assert self.sup.start(name) == RUNNING, self.sup.partitions[name].reason

    def nic(self, name: str):
        return self.sup.partitions[name].partition.virtio.devices[0].transport.model

    def wait(self, pred, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, {
                n: (e.state, e.reason) for n, e in self.sup.partitions.items()
            }
            time.sleep(0.01)

    def ended(self, *names: str) -> bool:
        return all(self.sup.partitions[n].state == STOPPED for n in names)

    def console(self, name: str) -> str:
        self.sup.flush_logs()
        return (self.logs / f"{name}.console.log").read_text()

    def close(self):
        self.sup.close()
        self.live.close()


def both_ended(up) -> tuple[dict, str, str]:
    """Wait until rx and tx under ``up`` (tests/test_supervisor_up.py UpProcess) both
    ended by their debug exit 0; (``ps``'s partitions, rx's console, tx's console)."""
    parts = up.wait_for(lambda p: p["rx"]["state"] == p["tx"]["state"] == "stopped", timeout=150)
    rx_out = (up.logs / "rx.console.log").read_text()
    tx_out = (up.logs / "tx.console.log").read_text()
    for name in ("rx", "tx"):
        assert parts[name]["reason"] == "debug exit with value 0", rx_out + tx_out
    return parts, rx_out, tx_out


def test_a_sender_snapshotted_mid_run_goes_on_and_the_receiver_gets_every_frame(tmp_path):
    snap = tmp_path / "tx.snap"
    up = Up(tmp_path / "up", plan())
    try:
        rx, tx_nic = up.nic("rx"), up.nic("tx")
        up.wait(lambda: tx_nic.counts["tx"] >= 20)  # DATA frames are on their way
        answer = up.snapshots.snapshot({"name": "tx", "dir": str(snap), "stop": True})
        assert answer["state"] == STOPPED
        sent = tx_nic.counts["tx"]
        assert 20 <= sent < COUNT, sent  # mid-run
        up.wait(lambda: rx.counts["rx"] == sent)  # the receiver took what was sent
        time.sleep(0.5)
        assert rx.counts["rx"] == sent  # the sender is stopped: nothing more comes
        assert up.sup.partitions["rx"].state == RUNNING  # the receiver waits

        restored = Snapshot.read(str(snap))
        try:
            assert up.sup.start("tx", restore=restored) == RUNNING
        finally:
            restored.close()
        tx = up.sup.partitions["tx"].partition
        assert tx.boot_log == (f"resumed the snapshot in {snap}",)
        assert up.nic("tx").backend is up.sup.networks["lan"].port(1)  # its port again
        up.wait(lambda: up.ended("rx", "tx"))
        rx_out, tx_out = up.console("rx"), up.console("tx")
        for name in ("rx", "tx"):
            assert up.sup.partitions[name].reason == "debug exit with value 0", rx_out + tx_out
        assert tx_out.count("virtionet: mac ") == 1  # resumed, not booted again
        assert f"virtionet: sent {COUNT} frames to {mac('rx')}\n" in tx_out
        # Every DATA frame in order, none twice, none lost: the receiver saw a pause.
        assert f"virtionet: received {COUNT} frames ok\n" in rx_out, rx_out
        assert "FAIL" not in rx_out + tx_out
        assert up.sup.networks["lan"].port(0).counts == {"queue_full": 0, "down": 0}
    finally:
        up.close()


def test_osvmm_snapshot_stop_and_osvmm_start_restore_under_the_same_up(rx_snapshot):
    """The same through the CLI and the control API, as a user: ``osvmm snapshot tx
    DIR --stop`` mid-exchange, ``osvmm start tx --restore DIR``; and a snapshot
    that is not the partition's (the receiver's, another MAC) refused in one line
    with nothing started."""
    import json

    from tests.test_supervisor_up import UpProcess

    up = UpProcess(plan(length=""))  # long frames: the exchange outlasts the CLI's calls
    try:
        up.wait_for(lambda p: p["rx"]["state"] == p["tx"]["state"] == "running")

        def nic(name: str) -> dict:
            r = up.cli("stat", name, "--json")
            assert r.returncode == 0, r.stderr
            ((dev,),) = (s["devices"] for s in json.loads(r.stdout)["partitions"])
            return dev

        deadline = time.monotonic() + 60
        while nic("tx")["counts"]["tx"] < 10:  # DATA frames on their way
            assert time.monotonic() < deadline
            time.sleep(0.05)
        snap = up.dir / "tx.snap"
        r = up.cli("snapshot", "tx", str(snap), "--stop")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().endswith("; stopped\n"), r.stdout
        sent = nic("tx")["counts"]["tx"]
        assert sent < COUNT + 3, sent  # mid-run

        r = up.cli("start", "tx", "--restore", str(rx_snapshot))
        assert r.returncode == 2
        assert r.stderr.decode() == (
            f"osvmm: error: partition 'tx': restore: NIC on network 'lan': MAC {mac('tx')}, "
            f"the snapshot's had {mac('rx')} (a plan's MAC is its network's and partition's: "
            "restore it as the partition it was)\n"
        )
        from osvmm.errors import ControlError
        from osvmm.up.protocol import call

        target = "/v1/partitions/tx/start"
        with pytest.raises(ControlError, match="^startPartition: restore needs an absolute dir"):
            call(up.sock, "POST", target, {"restore": "tx.snap"})
        with pytest.raises(ControlError, match="^partition .rx. is already running$"):
            call(up.sock, "POST", "/v1/partitions/rx/start", {"restore": str(snap)})
        r = up.cli("start", "tx", "--restore", str(snap))
        assert (r.returncode, r.stdout.decode()) == (0, "tx: running\n"), r.stderr
        parts, rx_out, tx_out = both_ended(up)
        assert parts["tx"]["boots"] == 2 and tx_out.count("virtionet: mac ") == 1
        assert f"virtionet: received {COUNT} frames ok\n" in rx_out, rx_out
        assert nic("rx")["backend"]["queue_full"] == 0
    finally:
        up.close()


@pytest.fixture(scope="module")
def rx_snapshot(tmp_path_factory):
    """The receiver snapshotted with ``stop`` while it waits for a sender (HELLO said,
    to no one: the sender was never started)."""
    tmp = tmp_path_factory.mktemp("rxsnap")
    snap = tmp / "rx.snap"
    up = Up(tmp / "up", plan(), start=("rx",))
    try:
        up.wait(lambda: up.nic("rx").counts["tx"] >= 1)  # its HELLO: it waits now
        time.sleep(0.2)
        answer = up.snapshots.snapshot({"name": "rx", "dir": str(snap), "stop": True})
        assert answer["state"] == STOPPED
    finally:
        up.close()
    return snap


def test_a_plans_restore_resumes_a_receiver_on_a_new_switch(tmp_path, rx_snapshot):
    from osvmm.up.partition_config import check_boot

    text = plan(rx_restore=f'restore = "{rx_snapshot}"\n')
    check_boot(place(parse_plan(text, tmp_path), read_topology()))  # what osvmm up checks
    up = Up(tmp_path, text)
    try:
        part = up.sup.partitions["rx"].partition
        assert part.boot_log == (f"resumed the snapshot in {rx_snapshot}",)
        up.wait(lambda: up.ended("rx", "tx"))
        rx_out, tx_out = up.console("rx"), up.console("tx")
        assert up.sup.partitions["rx"].reason == "debug exit with value 0", rx_out + tx_out
        assert "virtionet: mac" not in rx_out  # it went on from where it waited
        # The new switch never saw it before: the sender's PROBE was flooded to it, it
        # answered from its restored NIC, and the switch learned it from that answer.
        assert f"virtionet: sent {COUNT} frames to {mac('rx')}\n" in tx_out
        assert f"virtionet: received {COUNT} frames ok\n" in rx_out, rx_out
    finally:
        up.close()


@pytest.mark.parametrize(
    "body,message",
    [
        (
            partition("rx", "", "{restore}") + partition("tx", "send=1"),
            "partition 'rx': restore: the snapshot's NICs are on networks lan; this plan "
            "puts the partition on none",
        ),
        (
            plan(rx_restore="{restore}", network="san"),
            "partition 'rx': restore: the snapshot's NICs are on networks lan; this plan "
            "puts the partition on san",
        ),
        (
            plan(rx_restore="{restore}", rx="other"),
            f"partition 'other': restore: NIC on network 'lan': MAC {mac('other')}, the "
            f"snapshot's had {mac('rx')} (a plan's MAC is its network's and partition's: "
            "restore it as the partition it was)",
        ),
    ],
)
def test_a_plan_without_the_snapshots_network_or_mac_is_refused_before_anything_starts(
    tmp_path, rx_snapshot, body, message
):
    from osvmm.up.partition_config import check_boot

    text = body.replace("{restore}", f'restore = "{rx_snapshot}"\n')
    with pytest.raises(ConfigError) as err:
        check_boot(place(parse_plan(text, tmp_path), read_topology()))
    assert str(err.value) == message


def test_osvmm_run_refuses_to_restore_a_partition_that_was_on_a_network(rx_snapshot):
    from tests.helpers import run_osvmm

    r = run_osvmm("run", "--restore", str(rx_snapshot), timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.decode() == (
        f"osvmm: error: --restore {rx_snapshot}: partition 'rx' was on network lan of a "
        "plan, which osvmm run does not have: resume it under osvmm up, from a plan with that "
        "network "
        f'(restore = "{rx_snapshot}")\n'
    )


def test_a_takeover_moves_the_members_of_a_network_together_onto_its_new_switch():
    """``osvmm up --takeover`` mid-exchange: every member is paused at once, the
    frames the old switch had queued for a member go with its NIC, and the new
    VMM's switch (empty table) carries the rest: every frame arrives, in order."""
    import json

    from tests.helpers import run_osvmm
    from tests.test_supervisor_up import UpProcess

    old = UpProcess(plan(length=""))  # long frames: sending outlasts a takeover's start
    new_up = False
    try:
        old.wait_for(lambda p: p["rx"]["state"] == p["tx"]["state"] == "running")

        def sent() -> int:
            r = old.cli("stat", "tx", "--json")
            assert r.returncode == 0, r.stderr
            ((nic,),) = (s["devices"] for s in json.loads(r.stdout)["partitions"])
            return nic["counts"]["tx"]

        deadline = time.monotonic() + 60
        while sent() < 20:  # DATA frames on their way
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = run_osvmm("up", "-d", str(old.plan), "--takeover", timeout=120)
        assert r.returncode == 0, r.stderr
        new_up = True
        assert old.proc.wait(30) == 0  # the old VMM ended by itself
        log = (old.logs / "osvmm.log").read_text()
        assert "took over 2 partitions" in log, log
        parts, rx_out, tx_out = both_ended(old)
        assert rx_out.count("virtionet: mac ") == tx_out.count("virtionet: mac ") == 1
        assert f"virtionet: sent {COUNT} frames to {mac('rx')}\n" in tx_out
        assert f"virtionet: received {COUNT} frames ok\n" in rx_out, rx_out
    finally:
        if new_up:
            run_osvmm("down", "--socket", old.sock)
        old.close()


def test_a_migration_destination_without_the_network_refuses_before_any_page(tmp_path):
    from osvmm.errors import SnapshotError
    from osvmm.up.migrate import accept_partition
    from osvmm.vmm.snapshot import machine_state

    text = f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n' + plan(network="san")
    sup = Supervisor(place(parse_plan(text, tmp_path), read_topology()))
    try:
        machine = machine_state(sup.partitions["tx"].machine)
        profile = {"machine": machine, "networks": [["lan", mac("tx")]]}
        with pytest.raises(SnapshotError) as err:
            accept_partition(sup, None, "tx", profile)
        assert str(err.value) == (
            "partition 'tx': the snapshot's NICs are on networks lan; this plan puts the "
            "partition on san"
        )
    finally:
        sup.close()


def test_a_sender_migrated_to_osvmm_up_incoming_joins_that_vmms_network(tmp_path):
    """``osvmm migrate`` of a member waiting for its peer: it lands on its port of the
    destination's network of the same name, and a receiver started there meets it
    (the destination's switch learns it from its answer) and gets every frame."""
    import json
    import signal
    import subprocess

    from tests.helpers import run_osvmm
    from tests.test_migration import up_process
    from tests.test_supervisor_up import UpProcess

    # At the source the sender's only peer is a guest that says nothing and ends.
    src_plan = partition("tx", f"send=1 count={COUNT}") + (
        '[[partition]]\nname = "mute"\ncpus = "floating"\nmemory = "4M"\n'
        'image = "guests:hello"\nrestart = "stop"\n'
        '[[network]]\nname = "lan"\nmembers = ["tx", "mute"]\n'
    )
    src = UpProcess(src_plan)
    dst_plan = tmp_path / "dst.toml"
    dst_plan.write_text(
        f'[vmm]\ncontrol_socket = "{tmp_path}/dst.sock"\nlog_dir = "{tmp_path}/logs"\n' + plan()
    )
    addr = f"unix:{tmp_path}/in.sock"
    dst = up_process(dst_plan, "--incoming", addr)
    try:
        src.wait_for(lambda p: p["tx"]["state"] == "running")
        deadline = time.monotonic() + 30
        while not (tmp_path / "in.sock").exists():
            assert time.monotonic() < deadline and dst.poll() is None
            time.sleep(0.05)
        r = src.cli("migrate", "tx", "--to", addr)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().endswith("; here stopped\n"), r.stdout
        r = run_osvmm("start", "rx", "--socket", f"{tmp_path}/dst.sock")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 150
        while True:
            r = run_osvmm("ps", "--json", "--socket", f"{tmp_path}/dst.sock")
            assert r.returncode == 0, r.stderr
            parts = {p["name"]: p for p in json.loads(r.stdout)["partitions"]}
            if parts["rx"]["state"] == parts["tx"]["state"] == "stopped":
                break
            assert time.monotonic() < deadline, parts
            time.sleep(0.1)
        rx_out = (tmp_path / "logs" / "rx.console.log").read_text()
        tx_out = (tmp_path / "logs" / "tx.console.log").read_text()
        for name in ("rx", "tx"):
            assert parts[name]["reason"] == "debug exit with value 0", rx_out + tx_out
        assert "virtionet: mac" not in tx_out  # it went on from where it waited
        assert f"virtionet: sent {COUNT} frames to {mac('rx')}\n" in tx_out
        assert f"virtionet: received {COUNT} frames ok\n" in rx_out, rx_out
    finally:
        src.close()
        dst.send_signal(signal.SIGTERM)
        try:
            dst.wait(30)
        except subprocess.TimeoutExpired:
            dst.kill()
