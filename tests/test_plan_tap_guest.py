"""A plan's tap NICs end to end under KVM (``nets`` on ``[[partition]]``): the
bundled ``virtionet`` guest as the sender on a tap in a network namespace the
test makes, under ``osvmm up`` run in that namespace, and the host's end an
``AF_PACKET`` socket on the tap that answers the guest's PROBE and checks every
DATA frame (in order, its pattern and checksum). The guest sends; the host only
answers once, so no frame is in flight towards the guest while its tap moves.

- A plan with a tap NIC boots, the host gets every frame, ``osvmm stat`` counts
  them; stopped, the partition is kept built with its tap and a second start
  exchanges again; a fragment naming its tap is refused.
- ``osvmm snapshot --stop`` mid-exchange, then ``osvmm start --restore``, or a
  new ``osvmm up`` whose plan's ``restore`` names it (one without the tap NIC
  refused).
- ``osvmm up --takeover`` mid-exchange: the tap's descriptor handed over.
- ``osvmm migrate`` to ``osvmm up --incoming`` on the same host: the source
  releases its tap at stop-and-copy, the destination attaches it; a destination
  that cannot attach its tap leaves the source its own, attached again.

Each time the host gets every frame once and the guest says its MAC once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, run_osvmm
from tests.test_supervisor_up import UpProcess
from tests.test_virtio_net_guest import (
    ETHERTYPE,
    NETNS,
    TAP,
    netns,  # noqa: F401 - the fixture: a tap in a namespace
    pattern_frame,
)

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("netns")]
INSIDE = ("ip", "netns", "exec", NETNS)  # what the fixture yields

OTHER = bytes.fromhex("020000000099")  # a MAC on no NIC
COUNT = 250  # DATA frames of 40-1439 bytes: seconds of sending here, time to move it


def host_receiver(tap: str, count: int) -> None:
    """The host's end, run inside the namespace: answer the guest's PROBE with a
    HELLO from the tap's MAC, then check every DATA frame until END. Prints the
    tap's MAC, ``got N T`` per frame (T: CLOCK_MONOTONIC, the system's) and
    ``received N ok`` (or a FAIL line)."""
    import socket

    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    s.bind((tap, 0))
    s.settimeout(240)
    mine = s.getsockname()[4]
    print("tap", mine.hex(":"), flush=True)

    def frames():
        while True:
            frame, addr = s.recvfrom(4096)
            if addr[2] != socket.PACKET_OUTGOING:
                yield frame

    for frame in frames():
        if frame[14:15] == b"P":
            break
    guest = frame[6:12]
    s.send(pattern_frame(guest, mine, b"H", 0, 0))
    print("probe from", guest.hex(":"), flush=True)
    seq = 0
    for frame in frames():
        kind, n = frame[14:15], int.from_bytes(frame[15:19], "little")
        if frame[6:12] != guest:
            continue
        if kind == b"P":
            print("FAIL a second PROBE: the guest started again", flush=True)
            return
        if kind == b"D" and frame[:6] != mine:
            print(f"FAIL DATA {n} for {frame[:6].hex(':')}", flush=True)
            return
        if kind == b"D":
            length = int.from_bytes(frame[19:21], "little")
            want = pattern_frame(mine, guest, b"D", n, length)[: 21 + length + 4]
            if n != seq or frame[: len(want)] != want:
                print(f"FAIL DATA {n} (length {length}), {seq} expected", flush=True)
                return
            seq += 1
            print("got", seq, time.monotonic(), flush=True)
        elif kind == b"E":
            ok = "ok" if seq == n == count else f"FAIL (END says {n})"
            print("received", seq, ok, flush=True)
            return


def host_send(tap: str, frame: str) -> None:
    """One frame (hex) onto the tap from the host's side, run inside the namespace."""
    import socket

    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((tap, 0))
        s.send(bytes.fromhex(frame))


class Receiver:
    """``host_receiver`` in the namespace, bound before the guest can PROBE."""

    def __init__(self, count: int = COUNT):
        code = f"from tests.test_plan_tap_guest import host_receiver as r; r({TAP!r}, {count})"
        self.proc = subprocess.Popen(
            [*INSIDE, sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(REPO),
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        first = self.proc.stdout.readline().decode()
        assert first.startswith("tap "), (first, self.proc.stderr.read().decode())
        self.tap_mac = first.split()[1]
        self.lines: list[str] = []

    def until(self, prefix: str) -> str:
        """Read its lines until one starts with ``prefix`` (or it ends)."""
        while True:
            line = self.proc.stdout.readline().decode()
            if not line:
                err = self.proc.stderr.read().decode()
                raise AssertionError(f"the receiver ended: {self.lines[-3:]} {err}")
            self.lines.append(line.rstrip("\n"))
            if line.startswith(prefix) or line.startswith("FAIL"):
                return line.rstrip("\n")

    def got_after(self, moment: float) -> int:
        """How many DATA frames arrived after ``moment`` (time.monotonic)."""
        return sum(
            line.startswith("got ") and float(line.split()[2]) > moment for line in self.lines
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class NetnsUp(UpProcess):
    """``osvmm up`` inside the namespace; the CLI reaches it through its Unix socket."""

    def _popen(self, argv: list[str], env: dict) -> subprocess.Popen:
        return super()._popen([*INSIDE, *argv], env)


def plan(count: int = COUNT, name: str = "g") -> str:
    return (
        f'[[partition]]\nname = "{name}"\ncpus = "floating"\nmemory = "8M"\n'
        f'image = "guests:virtionet"\ncmdline = "send=1 count={count} budget=900"\n'
        f'restart = "stop"\nnets = ["tap={TAP}"]\n'
    )


def guest_mac() -> str:
    from osvmm.vmm.tap import default_mac

    return default_mac(TAP).hex(":")


def nic(up: UpProcess, socket_path: str | None = None) -> dict:
    r = run_osvmm("stat", "g", "--json", "--socket", socket_path or up.sock)
    assert r.returncode == 0, r.stderr
    ((dev,),) = (s["devices"] for s in json.loads(r.stdout)["partitions"])
    return dev


def check_guest_done(up: UpProcess, receiver: Receiver) -> None:
    """The host got every frame once, the guest ended well having said its MAC once."""
    assert receiver.until("received") == f"received {COUNT} ok", receiver.lines[-3:]
    parts = up.wait_for(lambda p: p["g"]["state"] == "stopped", timeout=120)
    console = (up.logs / "g.console.log").read_text()
    assert parts["g"]["reason"] == "debug exit with value 0", console
    assert f"virtionet: sent {COUNT} frames to {receiver.tap_mac}\n" in console, console
    assert "FAIL" not in console and console.count("virtionet: mac ") == 1, console


def test_a_plan_with_a_tap_nic_exchanges_frames_with_the_host_and_again_when_kept():
    receiver = Receiver(16)
    up = NetnsUp(plan(16))
    try:
        assert receiver.until("received") == "received 16 ok", receiver.lines
        parts = up.wait_for(lambda p: p["g"]["state"] == "stopped", timeout=120)
        console = (up.logs / "g.console.log").read_text()
        assert parts["g"]["reason"] == "debug exit with value 0", console
        assert console.startswith(f"virtionet: mac {guest_mac()}\n"), console
        assert f"virtionet: sent 16 frames to {receiver.tap_mac}\n" in console
        # As osvmm run --net's: PROBE, DATA, X, the frame of 1515 bytes (a tap takes it:
        # the 1514 limit is a plan network's switch's) and END out, the HELLO in.
        dev = nic(up)
        assert dev["name"] == f"virtio-net {TAP}", dev
        assert (dev["counts"]["tx"], dev["counts"]["tx_dropped"]) == (16 + 4, 0), dev
        assert dev["counts"]["rx"] >= 1, dev  # the HELLO (the host's kernel may say more)
        text = up.cli("stat", "g").stdout.decode()
        assert f"device 0 virtio-net {TAP}: " in text, text

        # Kept built between runs, its tap attached: a second start sends again, from
        # an empty queue (a stale HELLO from elsewhere would make the guest send there).
        receiver.close()
        stale = pattern_frame(bytes.fromhex(guest_mac().replace(":", "")), OTHER, b"H", 0, 0)
        code = (
            f"from tests.test_plan_tap_guest import host_send; host_send({TAP!r}, {stale.hex()!r})"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        subprocess.run([*INSIDE, sys.executable, "-c", code], check=True, cwd=str(REPO), env=env)
        receiver = Receiver(16)
        r = up.cli("start", "g")
        assert r.returncode == 0, r.stderr
        assert receiver.until("received") == "received 16 ok", receiver.lines
        parts = up.wait_for(lambda p: p["g"]["state"] == "stopped" and p["g"]["boots"] == 2)
        assert parts["g"]["reason"] == "debug exit with value 0"
        assert "not kept built" not in (up.logs / "osvmm.log").read_text()
        console = (up.logs / "g.console.log").read_text()
        assert console.count(f"virtionet: sent 16 frames to {receiver.tap_mac}\n") == 2, console

        # A partition created at run time cannot have the same tap.
        fragment = up.dir / "more.toml"
        fragment.write_text(plan(16, "h"))
        r = up.cli("create", str(fragment))
        assert r.returncode == 2, r.stderr
        assert r.stderr.decode() == (
            f"osvmm: error: partition 'h': nets: tap {TAP} is partition 'g''s NIC already "
            "(a tap is one NIC's)\n"
        )
    finally:
        receiver.close()
        up.close()


def test_a_snapshot_of_a_tap_nic_resumes_with_osvmm_start_restore():
    receiver = Receiver()
    up = NetnsUp(plan())
    try:
        receiver.until("got 20")
        snap = up.dir / "g.snap"
        r = up.cli("snapshot", "g", str(snap), "--stop")
        assert r.returncode == 0, r.stderr
        assert nic(up)["counts"]["tx"] < COUNT + 3  # mid-run
        r = up.cli("start", "g", "--restore", str(snap))
        moved = time.monotonic()
        assert (r.returncode, r.stdout.decode()) == (0, "g: running\n"), r.stderr
        check_guest_done(up, receiver)
        assert receiver.got_after(moved) > 0, receiver.lines[-3:]  # resumed mid-exchange
    finally:
        receiver.close()
        up.close()


def test_a_snapshot_of_a_tap_nic_resumes_from_a_plans_restore(tmp_path):
    """``osvmm snapshot --stop`` mid-exchange, that VMM ended, and a new ``osvmm up``
    whose plan has ``restore`` and the same tap NIC: the guest goes on from where
    it was, and a plan without the tap NIC is refused before anything starts."""
    receiver = Receiver()
    up = NetnsUp(plan())
    try:
        receiver.until("got 20")
        snap = tmp_path / "g.snap"
        r = up.cli("snapshot", "g", str(snap), "--stop")
        assert r.returncode == 0, r.stderr
    finally:
        up.close()
    try:
        from osvmm.errors import ConfigError
        from osvmm.plan.config import parse_plan
        from osvmm.plan.placement import place
        from osvmm.plan.topology import read_topology
        from osvmm.up.partition_config import check_boot

        text = plan().replace(f'nets = ["tap={TAP}"]', "") + f'restore = "{snap}"\n'
        with pytest.raises(ConfigError) as err:
            check_boot(place(parse_plan(text, tmp_path), read_topology()))
        assert str(err.value) == "partition 'g': restore: the snapshot has 1 NICs, 0 given"
        new = NetnsUp(plan() + f'restore = "{snap}"\n')
        moved = time.monotonic()
        try:
            assert receiver.until("received") == f"received {COUNT} ok", receiver.lines[-3:]
            parts = new.wait_for(lambda p: p["g"]["state"] == "stopped", timeout=120)
            console = (new.logs / "g.console.log").read_text()
            assert parts["g"]["reason"] == "debug exit with value 0", console
            assert "virtionet: mac" not in console  # resumed, not booted
            assert f"virtionet: sent {COUNT} frames to {receiver.tap_mac}\n" in console
            assert receiver.got_after(moved) > 0, receiver.lines[-3:]
        finally:
            new.close()
    finally:
        receiver.close()


def test_a_takeover_mid_exchange_hands_the_tap_over():
    receiver = Receiver()
    old = NetnsUp(plan())
    new_up = False
    try:
        receiver.until("got 20")
        r = run_osvmm("up", "-d", str(old.plan), "--takeover", timeout=120, prefix=INSIDE)
        moved = time.monotonic()
        assert r.returncode == 0, r.stderr
        new_up = True
        assert old.proc.wait(30) == 0  # the old VMM ended by itself
        assert "took over 1 partitions" in (old.logs / "osvmm.log").read_text()
        check_guest_done(old, receiver)
        assert receiver.got_after(moved) > 0, receiver.lines[-3:]  # moved mid-exchange
    finally:
        if new_up:
            run_osvmm("down", "--socket", old.sock)
        receiver.close()
        old.close()


def incoming(tmp_path, body: str) -> tuple[subprocess.Popen, str, str]:
    """``osvmm up --incoming`` in the namespace with plan ``body``, listening: the
    process, its address and its control socket."""
    dst_plan = tmp_path / "dst.toml"
    dst_sock = f"{tmp_path}/dst.sock"
    dst_plan.write_text(
        f'[vmm]\ncontrol_socket = "{dst_sock}"\nlog_dir = "{tmp_path}/logs"\n' + body
    )
    addr = f"unix:{tmp_path}/in.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OSVMM_DEBUG", None)
    dst = subprocess.Popen(
        [*INSIDE, sys.executable, "-m", "osvmm.cli", "up", str(dst_plan), "-q", "--incoming", addr],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=str(REPO),
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "in.sock").exists():
        if time.monotonic() > deadline or dst.poll() is not None:
            dst.kill()
            raise AssertionError(f"osvmm up --incoming did not start: {dst.communicate()[1]}")
        time.sleep(0.05)
    return dst, addr, dst_sock


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_a_migration_to_osvmm_up_incoming_releases_the_tap_to_the_destination(tmp_path):
    receiver = Receiver()
    src = NetnsUp(plan())
    dst, addr, dst_sock = incoming(tmp_path, plan())
    try:
        receiver.until("got 20")
        r = src.cli("migrate", "g", "--to", addr)
        moved = time.monotonic()
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().endswith("; here stopped\n"), r.stdout
        assert receiver.until("received") == f"received {COUNT} ok", receiver.lines[-3:]
        assert receiver.got_after(moved) > 0, receiver.lines[-3:]  # moved mid-exchange
        deadline = time.monotonic() + 120
        while True:
            r = run_osvmm("ps", "--json", "--socket", dst_sock)
            assert r.returncode == 0, r.stderr
            (part,) = json.loads(r.stdout)["partitions"]
            if part["state"] == "stopped":
                break
            assert time.monotonic() < deadline, part
            time.sleep(0.1)
        console = (tmp_path / "logs" / "g.console.log").read_text()
        assert part["reason"] == "debug exit with value 0", console
        assert "virtionet: mac" not in console  # it went on from where it was
        assert f"virtionet: sent {COUNT} frames to {receiver.tap_mac}\n" in console, console
        assert (src.logs / "g.console.log").read_text().count("virtionet: mac ") == 1
    finally:
        receiver.close()
        src.close()
        stop(dst)


def test_a_migration_whose_destination_cannot_attach_leaves_the_source_its_tap(tmp_path):
    """The destination names an interface that is no tap (with the NIC's MAC, so its
    plan passes the HELO's check): its build fails after the source released its
    tap, and the source attaches it again before the guest goes on."""
    receiver = Receiver()
    src = NetnsUp(plan())
    dst, addr, _ = incoming(tmp_path, plan().replace(f"tap={TAP}", f"tap=lo,mac={guest_mac()}"))
    try:
        receiver.until("got 20")
        r = src.cli("migrate", "g", "--to", addr)
        moved = time.monotonic()
        assert r.returncode == 2, r.stderr
        assert "tap=lo: cannot attach: not a tap" in r.stderr.decode(), r.stderr
        assert r.stderr.decode().count("\n") == 1, r.stderr
        check_guest_done(src, receiver)
        assert receiver.got_after(moved) > 0, receiver.lines[-3:]
        assert "after the failed migration" not in (src.logs / "osvmm.log").read_text()
    finally:
        receiver.close()
        src.close()
        stop(dst)
