"""``osvmm up`` with its control socket, driven as a user would: ps, stop, start,
restart, stat, console, down, and the errors (needs /dev/kvm)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, run_osvmm

pytestmark = pytest.mark.kvm


class UpProcess:
    """``osvmm up PLAN`` in the background, with a short socket path under /tmp."""

    def __init__(self, plan_body: str, extra_vmm: str = ""):
        self.dir = Path(tempfile.mkdtemp(prefix="osvmm-t-", dir="/tmp"))
        self.sock = str(self.dir / "ctl.sock")
        self.logs = self.dir / "logs"
        self.plan = self.dir / "plan.toml"
        self.plan.write_text(
            f'[vmm]\ncontrol_socket = "{self.sock}"\nlog_dir = "{self.logs}"\n{extra_vmm}\n'
            + plan_body
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("OSVMM_DEBUG", None)
        self.proc = self._popen([sys.executable, "-m", "osvmm.cli", "up", str(self.plan)], env)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()  # never leave a VMM behind a failed test
                out, err = self.proc.communicate(timeout=10)
                raise AssertionError(f"osvmm up did not start: {err and err.decode()}")
            time.sleep(0.05)

    def _popen(self, argv: list[str], env: dict) -> subprocess.Popen:
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(REPO),
        )

    def cli(self, *args: str, timeout: float = 60):
        return run_osvmm(*args, "--socket", self.sock, timeout=timeout)

    def ps(self) -> dict:
        r = self.cli("ps", "--json")
        assert r.returncode == 0, r.stderr
        return {p["name"]: p for p in json.loads(r.stdout)["partitions"]}

    def wait_for(self, pred, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while True:
            parts = self.ps()
            if pred(parts):
                return parts
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; partitions: {parts}")
            time.sleep(0.1)

    def close(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode, (out or b"").decode(), (err or b"").decode()


PLAN = """
[[partition]]
name = "counter"
cpus = "floating"
memory = "8M"
image = "guests:counter"
cmdline = "every=0x4000000"

[[partition]]
name = "hello"
cpus = "floating"
memory = "4M"
image = "guests:hello"
"""


@pytest.fixture(scope="module")
def vmm():
    up = UpProcess(PLAN)
    yield up
    up.close()


def test_ps_shows_each_partition_in_its_state(vmm):
    parts = vmm.wait_for(
        lambda p: p["hello"]["state"] == "stopped" and p["counter"]["state"] == "running"
    )
    assert parts["hello"]["reason"] == "debug exit with value 0"
    assert parts["hello"]["boots"] == 1 and parts["counter"]["boots"] == 1
    assert parts["counter"]["index"] == 0 and parts["hello"]["index"] == 1
    r = vmm.cli("ps")
    assert r.returncode == 0
    lines = r.stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["NAME", "STATE", "CPUS"]
    assert re.match(r"counter\s+running\s+floating\(0-1\)\s+0\s+8M\s+1\s+0\s+\d", lines[1])
    assert re.match(r"hello\s+stopped\s+.*debug exit with value 0$", lines[2])


def test_console_is_logged_per_partition(vmm):
    vmm.wait_for(lambda p: p["hello"]["state"] == "stopped")
    log = (vmm.logs / "hello.console.log").read_text()
    assert log.startswith("Hello from osvmm guest\n")
    assert "[osvmm: ended: debug exit with value 0]" in log
    events = (vmm.logs / "osvmm.log").read_text()
    assert "hello: ended: debug exit with value 0" in events
    assert "hello: stopped (policy stop)" in events


def test_stop_start_restart(vmm):
    vmm.wait_for(lambda p: p["counter"]["state"] == "running")
    r = vmm.cli("stop", "counter")
    assert (r.returncode, r.stdout) == (0, b"counter: stopped (stopped by the VMM)\n"), r.stderr
    assert vmm.ps()["counter"]["state"] == "stopped"
    r = vmm.cli("stop", "counter")
    assert r.returncode == 2
    assert r.stderr == b"osvmm: error: partition 'counter' is not running (stopped)\n"
    r = vmm.cli("start", "counter")
    assert (r.returncode, r.stdout) == (0, b"counter: running\n"), r.stderr
    before = vmm.ps()["counter"]
    r = vmm.cli("restart", "counter")
    assert (r.returncode, r.stdout) == (0, b"counter: running\n"), r.stderr
    after = vmm.ps()["counter"]
    assert after["boots"] == before["boots"] + 1
    assert after["tids"] != before["tids"]  # fresh vCPU threads: a fresh partition
    r = vmm.cli("start", "hello")  # a stopped partition boots again
    assert r.returncode == 0 and r.stdout.startswith(b"hello: "), r.stderr
    vmm.wait_for(lambda p: p["hello"]["boots"] == 2 and p["hello"]["state"] == "stopped")


def test_stat_shows_kvm_and_vmm_exits(vmm):
    vmm.wait_for(lambda p: p["counter"]["state"] == "running")
    r = vmm.cli("stat", "counter", "--json")
    assert r.returncode == 0, r.stderr
    (stat,) = json.loads(r.stdout)["partitions"]
    assert stat["name"] == "counter" and stat["live"] is True
    assert "exits" in stat["vcpus"][0]["kvm"]
    r = vmm.cli("stat")
    text = r.stdout.decode()
    assert "partition counter (now)" in text
    assert "partition hello (at the end of its last run)" in text
    assert re.search(r"vcpu 0: exits the VMM handled\n\s+IoIn\s+\d+\n\s+IoOut\s+\d+", text)


def test_console_streams_output_and_detaches_on_ctrl_a_x(vmm):
    vmm.wait_for(lambda p: p["counter"]["state"] == "running")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "osvmm.cli", "console", "counter", "--socket", vmm.sock],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert re.fullmatch(rb"counter: \d+\n", line), line
        proc.stdin.write(b"abc\x01x")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
        err = proc.stderr.read().decode()
        assert "console of counter (Ctrl-A x detaches)" in err and "detached" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_client_errors_are_one_line_with_status_2(vmm):
    r = vmm.cli("stop", "nosuch")
    assert r.returncode == 2
    assert r.stderr == b"osvmm: error: no partition named 'nosuch' (partitions: counter, hello)\n"
    r = run_osvmm("ps", "--socket", "/tmp/osvmm-no-such-dir/x.sock")
    assert r.returncode == 2
    assert r.stderr == (
        b"osvmm: error: no VMM is listening on /tmp/osvmm-no-such-dir/x.sock: "
        b"start one with osvmm up FILE\n"
    )
    r = run_osvmm("up", str(vmm.plan))  # the same socket: refused, nothing started
    assert r.returncode == 2
    held = rb"osvmm: error: a VMM \(pid \d+\) already serves .*ctl.sock \(osvmm down"
    assert re.match(held, r.stderr)
    assert len(r.stderr.splitlines()) == 1


def test_up_refuses_a_plan_it_cannot_boot(tmp_path):
    plan = tmp_path / "bad.toml"
    plan.write_text(
        f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n'
        '[[partition]]\nname = "a"\ncpus = "floating"\nmemory = "4M"\nimage = "guests:nope"\n'
    )
    r = run_osvmm("up", str(plan))
    assert r.returncode == 2
    assert r.stderr.startswith(b"osvmm: error: no bundled guest 'nope'")
    plan.write_text(plan.read_text().replace('"floating"', '"7"'))
    r = run_osvmm("up", str(plan))
    assert r.returncode == 2 and b"cpus: CPU 7 does not exist" in r.stderr


def test_down_stops_everything_and_removes_the_socket():
    up = UpProcess(PLAN)
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        r = up.cli("down")
        assert r.returncode == 0, r.stderr
        assert up.proc.wait(timeout=30) == 0
        assert not os.path.exists(up.sock)
        out = up.proc.stdout.read().decode()
        assert "hello | Hello from osvmm guest" in out
        err = up.proc.stderr.read().decode()
        assert "osvmm: counter: ended: the VMM is shutting down" in err
    finally:
        up.close()


def test_detach_returns_once_the_vmm_is_up(tmp_path):
    sockdir = Path(tempfile.mkdtemp(prefix="osvmm-d-", dir="/tmp"))
    sock = sockdir / "c.sock"
    plan = tmp_path / "p.toml"
    plan.write_text(
        f'[vmm]\ncontrol_socket = "{sock}"\nlog_dir = "{tmp_path}/logs"\n' + PLAN,
    )
    try:
        r = run_osvmm("up", "--detach", str(plan), timeout=60)
        assert r.returncode == 0, r.stderr
        assert re.match(rb"osvmm: 2 partitions up, control socket .* \(pid \d+\)\n", r.stderr)
        r = run_osvmm("ps", "--plan", str(plan))  # the socket found through the plan
        assert r.returncode == 0 and b"counter" in r.stdout
    finally:
        run_osvmm("down", "--socket", str(sock))
        shutil.rmtree(sockdir, ignore_errors=True)
    assert not sock.exists()
