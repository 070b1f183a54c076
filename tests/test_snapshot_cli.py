"""Snapshots through the command line (needs /dev/kvm): ``osvmm run --snapshot`` on
SIGUSR2 and ``osvmm run --restore``, ``osvmm snapshot`` against ``osvmm up`` and a
plan's ``restore``; and every bad input refused in one line, status 2, nothing
started and nothing stopped."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from osvmm.snapshot import format as fmt
from tests.helpers import REPO, run_osvmm
from tests.test_supervisor_up import UpProcess

pytestmark = pytest.mark.kvm

EVERY = 1 << 23


class RunProcess:
    """``osvmm run ARGS`` in the background, its stdout collected as it comes."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("OSVMM_DEBUG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "osvmm.cli", "run", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(REPO),
        )
        fd = self.proc.stdout.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.out = b""

    def read(self) -> str:
        try:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            chunk = b""
        self.out += chunk
        return self.out.decode()

    def wait_for_lines(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(counter_lines(self.read())) < n:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    def finish(self, sig=None, timeout: float = 30) -> tuple[int, str, str]:
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETFL, 0)
        self.out += self.proc.stdout.read()
        return self.proc.returncode, self.out.decode(), self.proc.stderr.read().decode()


def counter_lines(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"counter: (\d+)\n", text)]


def assert_consecutive(lines: list[int]) -> None:
    assert lines and lines == [EVERY * (lines[0] // EVERY + i) for i in range(len(lines))], lines


def test_run_snapshot_on_sigusr2_then_restore_goes_on(tmp_path):
    snap = tmp_path / "snap"
    run = RunProcess(
        "guests:counter", "--append", f"every={EVERY}", "--snapshot", str(snap), "--snapshot-stop"
    )
    run.wait_for_lines(2)
    run.proc.send_signal(signal.SIGUSR2)
    status, first, err = run.finish()
    assert status == 0, err
    assert re.search(r"osvmm: snapshot in .*: \d+ KiB of 64 MiB memory stored, paused", err), err

    again = RunProcess("--restore", str(snap))
    again.wait_for_lines(2)
    status, second, err = again.finish(signal.SIGINT)
    assert status == 130, err
    assert f"resumed the snapshot in {snap}" in err
    assert_consecutive(counter_lines(first + second))


def test_a_snapshot_without_stop_lets_the_run_go_on(tmp_path):
    run = RunProcess(
        "guests:counter", "--append", f"every={EVERY}", "--snapshot", str(tmp_path / "s")
    )
    run.wait_for_lines(1)
    run.proc.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not (tmp_path / "s" / "state").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    n = len(counter_lines(run.read()))
    run.wait_for_lines(n + 2)
    status, out, _ = run.finish(signal.SIGINT)
    assert status == 130
    assert_consecutive(counter_lines(out))


# -- bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A snapshot of the counter guest (8 MiB), made once through the CLI."""
    snap = tmp_path_factory.mktemp("good") / "snap"
    run = RunProcess(
        "guests:counter",
        *("--memory", "8M", "--append", f"every={EVERY}"),
        *("--snapshot", str(snap), "--snapshot-stop"),
    )
    run.wait_for_lines(1)
    run.proc.send_signal(signal.SIGUSR2)
    assert run.finish()[0] == 0
    return snap


def spoiled(good, tmp_path, spoil):
    snap = tmp_path / "bad"
    shutil.copytree(good, snap)
    spoil(snap)
    return snap


def one_line_error(r, *fragments: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("osvmm: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert r.stdout == b""  # nothing ran
    return lines[0]


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite(snap, change) -> None:
    state = fmt.decode((snap / "state").read_bytes())
    change(state)
    (snap / "state").write_bytes(fmt.encode(state))


def first_extent(snap) -> int:
    return fmt.decode((snap / "state").read_bytes())["images"]["memory"]["extents"][0][0]


BAD = {
    "truncated state": (lambda s: os.truncate(s / "state", 100), "truncated"),
    "corrupted state": (lambda s: flip(s / "state", 200), "checksum mismatch"),
    "wrong version": (
        lambda s: (s / "state").write_bytes(
            (s / "state").read_bytes()[:8] + struct.pack("<I", 3) + (s / "state").read_bytes()[12:]
        ),
        "format version 3; this osvmm reads versions 1, 2",
    ),
    "not a snapshot": (
        lambda s: (s / "state").write_bytes(b"\x7fELF" + bytes(100)),
        "not an osvmm",
    ),
    "no state": (lambda s: (s / "state").unlink(), "not a snapshot"),
    "corrupted memory": (lambda s: flip(s / "memory", first_extent(s) + 5), "checksum mismatch"),
    "truncated memory": (lambda s: os.truncate(s / "memory", 4 << 20), "truncated"),
    "wrong-size memory": (lambda s: os.truncate(s / "memory", 9 << 20), "wrong size"),
    "no memory": (lambda s: (s / "memory").unlink(), "No such file"),
    "wrong-size vcpu state": (
        lambda s: rewrite(s, lambda st: st["vcpus"][0].update(regs=b"\0" * 100)),
        "regs: 100 bytes",
    ),
    "state for another memory size": (
        lambda s: rewrite(s, lambda st: st["machine"].update(memory=16 << 20)),
        "memory image",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_snapshot_is_one_line_and_status_2(good, tmp_path, case):
    spoil, fragment = BAD[case]
    snap = spoiled(good, tmp_path, spoil)
    one_line_error(run_osvmm("run", "--restore", str(snap)), fragment)


def test_restore_takes_no_image_or_machine_options(good):
    one_line_error(
        run_osvmm("run", "--restore", str(good), "guests:hello", "--memory", "8M"),
        "leave out IMAGE, --memory",
    )


def test_restore_of_nothing(tmp_path):
    one_line_error(run_osvmm("run", "--restore", str(tmp_path / "nowhere")), "no such directory")


def test_up_refuses_a_plan_whose_snapshot_does_not_fit_before_starting_anything(good, tmp_path):
    sock = tmp_path / "s.sock"
    body = f'[vmm]\ncontrol_socket = "{sock}"\n[[partition]]\nname = "c"\ncpus = "floating"\n'
    for memory, fragment in (("16M", "does not fit"), ("8M", "checksum mismatch")):
        snap = good if memory == "16M" else spoiled(good, tmp_path, lambda s: flip(s / "state", 99))
        plan = tmp_path / "plan.toml"
        plan.write_text(
            body + f'memory = "{memory}"\nimage = "guests:counter"\nrestore = "{snap}"\n'
        )
        one_line_error(run_osvmm("up", str(plan), "--log-dir", str(tmp_path / "logs")), fragment)
        assert not sock.exists() and not (tmp_path / "logs").exists()  # nothing started


def test_snapshot_errors_through_the_control_socket(tmp_path):
    one_line_error(
        run_osvmm("snapshot", "c", str(tmp_path / "s"), "--socket", str(tmp_path / "none.sock")),
        "no VMM is listening",
    )
    up = UpProcess(
        '[[partition]]\nname = "hello"\ncpus = "floating"\nmemory = "4M"\nimage = "guests:hello"\n'
    )
    try:
        up.wait_for(lambda p: p["hello"]["state"] == "stopped")
        one_line_error(up.cli("snapshot", "hello", str(tmp_path / "s")), "not running")
        one_line_error(up.cli("snapshot", "nobody", str(tmp_path / "s")), "no partition named")
    finally:
        up.close()
    assert not (tmp_path / "s").exists()


# -- osvmm up ---------------------------------------------------------------------------------

UP_PLAN = """
[[partition]]
name = "counter"
cpus = "floating"
memory = "8M"
image = "guests:counter"
cmdline = "every={every}"
{restore}
[[partition]]
name = "other"
cpus = "floating"
memory = "8M"
image = "guests:counter"
cmdline = "every={every}"
"""


def console_log(up, name: str) -> str:
    path = up.logs / f"{name}.console.log"
    return path.read_text() if path.exists() else ""


def guest_text(log: str) -> str:
    """A console log without the VMM's ``[osvmm: ...]`` lines (they may follow a
    line the guest had not finished)."""
    return re.sub(r"\[osvmm: [^\]\n]*\]\n", "", log)


def test_up_snapshot_stop_and_a_plan_that_restores_it(tmp_path):
    snap = tmp_path / "snap"
    up = UpProcess(UP_PLAN.format(every=EVERY, restore=""))
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        deadline = time.monotonic() + 60
        while len(counter_lines(console_log(up, "counter"))) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = up.cli("snapshot", "counter", str(snap))
        assert r.returncode == 0, r.stderr
        assert re.match(rb"counter: snapshot in .*paused [\d.]+ ms; running\n", r.stdout), r.stdout
        r = up.cli("snapshot", "counter", str(snap), "--stop")
        assert r.returncode == 0, r.stderr
        assert r.stdout.endswith(b"; stopped\n"), r.stdout
        parts = up.ps()
        assert parts["counter"]["state"] == "stopped"
        assert parts["counter"]["reason"] == f"stopped after a snapshot to {snap}"
        assert parts["other"]["state"] == "running"  # its neighbour went on
        # The log is written by a thread of its own: the VMM's "ended" note comes
        # after every byte the guest wrote, so once it is there, all of it is.
        deadline = time.monotonic() + 30
        while "[osvmm: ended: " not in (first := console_log(up, "counter")):
            assert time.monotonic() < deadline, first[-500:]
            time.sleep(0.05)
    finally:
        up.close()

    up = UpProcess(UP_PLAN.format(every=EVERY, restore=f'restore = "{snap}"'))
    try:
        deadline = time.monotonic() + 60
        while len(counter_lines(console_log(up, "counter"))) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = console_log(up, "counter")
    finally:
        up.close()
    # The snapshot may cut a line in two: its start ends the first log and its
    # end opens the second. Join the guest's text, without the VMM's notes.
    assert_consecutive(counter_lines(guest_text(first) + guest_text(second)))
