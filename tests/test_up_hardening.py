"""``osvmm up`` against what its host and its users throw at it (needs /dev/kvm):
a stdout nobody reads or that is closed, a full stderr, closed standard fds when
detaching, ending signals, a full disk, a stalled first VMM on the same socket,
CPUs dedicated by another VMM, a huge restart backoff, a unsafe log directory."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, run_osvmm
from tests.test_supervisor_up import UpProcess

pytestmark = pytest.mark.kvm

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python 3.10+ names it; not on every build)

CHATTY = """
[[partition]]
name = "counter"
cpus = "floating"
memory = "8M"
image = "guests:counter"
cmdline = "every=0x1000"

[[partition]]
name = "hello"
cpus = "floating"
memory = "4M"
image = "guests:hello"
"""


class Up(UpProcess):
    """UpProcess with its standard streams chosen by the test."""

    def __init__(self, plan_body: str, extra_vmm: str = "", **popen):
        self.popen = popen
        super().__init__(plan_body, extra_vmm)

    def _popen(self, argv, env):
        kw = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        kw.update(self.popen)
        return subprocess.Popen(argv, cwd=str(REPO), **kw)

    def console_size(self, name: str) -> int:
        try:
            return (self.logs / f"{name}.console.log").stat().st_size
        except FileNotFoundError:
            return 0

    def down(self) -> int:
        r = self.cli("down")
        assert r.returncode == 0, r.stderr
        return self.proc.wait(30)


def grows(up: Up, name: str, seconds: float = 1.0) -> bool:
    a = up.console_size(name)
    time.sleep(seconds)
    return up.console_size(name) > a


def test_a_stdout_nobody_reads_never_stalls_a_partition():
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)  # full after a few lines: nobody reads it
    up = Up(CHATTY, stdout=w)
    os.close(w)
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        deadline = time.monotonic() + 60
        while up.console_size("counter") < 3 * 4096:  # well past what the pipe holds
            assert time.monotonic() < deadline, up.console_size("counter")
            time.sleep(0.2)
        assert grows(up, "counter")  # still printing, into its log
        assert up.down() == 0
        log = (up.logs / "counter.console.log").read_bytes()
        assert log.endswith(b"[osvmm: ended: the VMM is shutting down]\n")
    finally:
        os.close(r)
        up.close()


def test_stdout_closed_kills_no_partition():
    up = Up(CHATTY, stdout=None, preexec_fn=lambda: os.close(1))
    try:
        parts = up.wait_for(lambda p: p["hello"]["state"] == "stopped")
        assert parts["hello"]["reason"] == "debug exit with value 0"
        assert parts["counter"]["state"] == "running" and grows(up, "counter")
        assert up.down() == 0
    finally:
        up.close()


def test_a_full_stderr_changes_nothing():
    with open("/dev/full", "wb") as full:
        up = Up(CHATTY, stderr=full, stdout=subprocess.DEVNULL)
    try:
        up.wait_for(lambda p: p["hello"]["state"] == "stopped")
        reply = json.loads(up.cli("ps", "--json").stdout)
        assert reply["lost"]["stderr"]["error"] == "No space left on device"
        assert up.down() == 0
        assert (
            "stderr: cannot write (No space left on device)" in (up.logs / "osvmm.log").read_text()
        )
    finally:
        up.close()


def test_detach_with_stdin_and_stdout_closed_returns(tmp_path):
    plan = tmp_path / "plan.toml"
    sock = tmp_path / "s"
    plan.write_text(f'[vmm]\ncontrol_socket = "{sock}"\nlog_dir = "{tmp_path}/logs"\n' + CHATTY)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m osvmm.cli up -d "{plan}" <&- >&-'],
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert re.match(rb"osvmm: 2 partitions up, control socket .* \(pid \d+\)\n$", r.stderr)
    assert run_osvmm("down", "--socket", str(sock)).returncode == 0


@pytest.mark.parametrize(
    "sig, status",
    [(signal.SIGHUP, 0), (signal.SIGQUIT, 0), (signal.SIGTERM, 0), (signal.SIGINT, 130)],
)
def test_ending_signals_stop_every_partition_first(sig, status):
    up = Up(CHATTY, stdout=subprocess.DEVNULL)
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        up.proc.send_signal(sig)
        assert up.proc.wait(30) == status
        assert not os.path.exists(up.sock) and not os.path.exists(up.sock + ".lock")
        log = (up.logs / "counter.console.log").read_bytes()
        assert log.endswith(b"[osvmm: ended: the VMM is shutting down]\n")
    finally:
        up.close()


def test_a_full_disk_is_said_on_stderr_and_in_ps():
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 10, 8 << 10))

    up = Up(CHATTY, stdout=subprocess.DEVNULL, preexec_fn=limited)
    try:
        parts = up.wait_for(lambda p: p["counter"]["console_lost"]["log_error"] != "", timeout=60)
        assert parts["counter"]["console_lost"]["log_error"] == "File too large"
        assert parts["counter"]["console_lost"]["log"] > 0
        assert parts["counter"]["state"] == "running"
        up.proc.send_signal(signal.SIGTERM)
        _, err = up.proc.communicate(timeout=30)
        assert b"osvmm: counter.console.log: cannot write (File too large)" in err
    finally:
        up.close()


def test_console_logs_rotate_at_console_log_max():
    up = Up(CHATTY, 'console_log_max = "16K"', stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (up.logs / "counter.console.log.1").exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert up.console_size("counter") <= 16 << 10
        assert (up.logs / "counter.console.log.1").stat().st_size == 16 << 10
        assert sorted(os.listdir(up.logs)) == [
            "counter.console.log",
            "counter.console.log.1",
            "hello.console.log",
            "osvmm.log",
        ]
        assert up.down() == 0
    finally:
        up.close()


def test_a_second_vmm_is_refused_while_the_first_is_stalled():
    up = Up(CHATTY, stdout=subprocess.DEVNULL)
    waiting = []
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        up.proc.send_signal(signal.SIGSTOP)  # stalled: answers nothing, fills its backlog
        for _ in range(64):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(up.sock)
            except BlockingIOError:
                pass
            waiting.append(s)
        r = run_osvmm("up", str(up.plan), timeout=60)
        assert r.returncode == 2
        assert (
            r.stderr
            == (
                f"osvmm: error: a VMM (pid {up.proc.pid}) already serves {up.sock} "
                "(osvmm down stops it)\n"
            ).encode()
        )
    finally:
        for s in waiting:
            s.close()
        up.proc.send_signal(signal.SIGCONT)
        up.close()


def test_log_dir_writable_by_others_is_refused(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chmod(logs, 0o777)
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[vmm]\ncontrol_socket = "{tmp_path}/s"\nlog_dir = "{logs}"\n' + CHATTY)
    r = run_osvmm("up", str(plan))
    assert r.returncode == 2
    assert (
        r.stderr
        == (
            f"osvmm: error: log_dir: {logs} is writable by other users (mode 0777): "
            "use a directory only you can write\n"
        ).encode()
    )
    assert os.listdir(logs) == []


def test_a_socket_directory_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[vmm]\ncontrol_socket = "{shared}/s"\nlog_dir = "{tmp_path}/l"\n' + CHATTY)
    r = run_osvmm("up", str(plan))
    assert r.returncode == 2
    assert r.stderr.startswith(f"osvmm: error: control_socket: {shared} is writable".encode())


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")
def test_a_dedicated_cpu_is_reserved_against_every_other_osvmm():
    dedicated = CHATTY.replace('cpus = "floating"\nmemory = "8M"', 'cpus = "1"\nmemory = "8M"')
    up = Up(dedicated, stdout=subprocess.DEVNULL)
    other = None
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        # a second plan dedicating the same CPU: refused, naming it and the holder
        clash = Path(up.dir) / "clash.toml"
        clash.write_text(
            f'[vmm]\ncontrol_socket = "{up.dir}/other.sock"\nlog_dir = "{up.dir}/o"\n' + dedicated
        )
        r = run_osvmm("up", str(clash))
        assert r.returncode == 2
        held = rf"osvmm: error: CPU 1 is dedicated to another VMM \(pid {up.proc.pid}, "
        assert re.match(held.encode(), r.stderr), r.stderr
        # a floating plan keeps off CPU 1
        floating = Path(up.dir) / "floating.toml"
        floating.write_text(
            f'[vmm]\ncontrol_socket = "{up.dir}/f.sock"\nlog_dir = "{up.dir}/f"\n' + CHATTY
        )
        other = subprocess.Popen(
            [sys.executable, "-m", "osvmm.cli", "up", str(floating)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(f"{up.dir}/f.sock"):
            assert other.poll() is None and time.monotonic() < deadline, other.stderr.read()
            time.sleep(0.05)
        time.sleep(0.5)
        reply = json.loads(run_osvmm("ps", "--json", "--socket", f"{up.dir}/f.sock").stdout)
        assert {p["pool"] for p in reply["partitions"]} == {"0"}
        for tid in reply["partitions"][0]["tids"]:
            status = Path(f"/proc/{other.pid}/task/{tid}/status").read_text()
            assert re.search(r"Cpus_allowed_list:\s+0\n", status), status
        # and so does osvmm run
        run = subprocess.Popen(
            [sys.executable, "-m", "osvmm.cli", "run", "guests:counter", "--append", "every=4096"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        try:
            assert run.stdout.read(1)
            allowed = []
            for t in os.listdir(f"/proc/{run.pid}/task"):
                try:  # a short-lived thread may end between the listing and the read
                    allowed.append(Path(f"/proc/{run.pid}/task/{t}/status").read_text())
                except FileNotFoundError:
                    continue
            assert all(re.search(r"Cpus_allowed_list:\s+0\n", s) for s in allowed)
        finally:
            run.kill()
            run.wait()
    finally:
        if other is not None:
            other.send_signal(signal.SIGTERM)
            other.wait(30)
        up.close()
    # the reservation died with its VMM
    from osvmm.up.locks import others_cpus

    assert 1 not in others_cpus()


def test_a_huge_restart_backoff_is_capped_and_stop_still_works(tmp_path):
    from osvmm.plan.config import parse_plan
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology
    from osvmm.up.supervisor import BACKOFF, MAX_BACKOFF_MS, STOPPED, Supervisor

    plan = parse_plan(
        f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n'
        '[[partition]]\nname = "crash"\ncpus = "floating"\nmemory = "4M"\n'
        'image = "guests:triplefault"\nrestart = "restart"\nrestart_limit = 3\n',
        tmp_path,
    )
    spec = dataclasses.replace(plan.partitions[0], restart_backoff_ms=10**400)
    plan = dataclasses.replace(plan, partitions=(spec,))
    sup = Supervisor(place(plan, read_topology()), log_dir=str(tmp_path / "logs"))
    try:
        sup.start("crash", wait=False)
        entry = sup.partitions["crash"]
        deadline = time.monotonic() + 30
        while entry.state != BACKOFF:
            assert time.monotonic() < deadline, (entry.state, entry.reason)
            time.sleep(0.02)
        t = time.monotonic()
        assert sup.stop("crash", timeout=10) == STOPPED
        assert time.monotonic() - t < 5
        sup.flush_logs()
        log = (tmp_path / "logs" / "osvmm.log").read_text()
        assert f"crash: restart 1/3 in {MAX_BACKOFF_MS} ms" in log
        assert "internal error" not in log
    finally:
        sup.close()
