"""``osvmm up`` as a service: the systemd unit (tools/systemd/osvmm@.service) is one
systemd itself accepts, and the VMM tells a service manager it is ready once its
control socket serves, and that it is stopping on SIGTERM (the sd_notify
protocol on ``$NOTIFY_SOCKET``; needs /dev/kvm for the VMM)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from osvmm.up.notify import notify
from osvmm.up.protocol import is_listening
from tests.helpers import REPO

UNIT = REPO / "tools" / "systemd" / "osvmm@.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path):
    text = UNIT.read_text()
    assert "\nType=notify\n" in text and "\nExecStart=osvmm up " in text
    # systemd-analyze checks the command exists: this host's osvmm, as setup.sh installs it
    unit = tmp_path / "osvmm@test.service"
    unit.write_text(text.replace("ExecStart=osvmm ", f"ExecStart={sys.executable} -m osvmm.cli "))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_notify_without_a_manager_does_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))  # a manager that went away
    assert notify("READY=1") is False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram_of_lines(monkeypatch, tmp_path, abstract):
    name = f"osvmm-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name if abstract else name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name if abstract else name)
        assert notify("READY=1", "STATUS=up") is True
        assert manager.recv(4096) == b"READY=1\nSTATUS=up"


@pytest.mark.kvm
def test_the_vmm_is_ready_once_it_serves_and_says_it_stops(tmp_path):
    sock = tmp_path / "ctl.sock"
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[vmm]\ncontrol_socket = "{sock}"\nlog_dir = "{tmp_path}/logs"\n'
        '[[partition]]\nname = "counter"\ncpus = "floating"\nmemory = "8M"\n'
        'image = "guests:counter"\n'
    )
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(60)
    env = dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=str(tmp_path / "notify"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "osvmm.cli", "up", "--quiet", str(plan)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        ready = manager.recv(4096).decode().split("\n")
        assert ready[0] == "READY=1" and f"MAINPID={proc.pid}" in ready, ready
        assert f"STATUS=1 partitions, control socket {sock}" in ready
        assert is_listening(str(sock))  # ready means it serves
        proc.send_signal(signal.SIGTERM)
        stopping = manager.recv(4096).decode().split("\n")
        assert stopping == ["STOPPING=1", "STATUS=down: stopping every partition"]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
        manager.close()
    assert b"Traceback" not in err
    assert not sock.exists()  # gone with the VMM


def wait_log(up, text: str) -> str:
    """osvmm.log once it holds ``text`` (its lines are written by a thread of their own)."""
    deadline = time.monotonic() + 10
    while text not in (events := (up.logs / "osvmm.log").read_text()):
        assert time.monotonic() < deadline, events[-500:]
        time.sleep(0.05)
    return events


@pytest.mark.kvm
def test_sighup_to_a_service_rereads_the_plan_and_follows_a_rotated_log(tmp_path, monkeypatch):
    from tests.test_supervisor_up import UpProcess

    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    body = (
        '[[partition]]\nname = "counter"\ncpus = "floating"\nmemory = "8M"\n'
        'image = "guests:counter"\ncmdline = "every=0x100000"\n'
    )
    up = UpProcess(body)
    try:
        assert manager.recv(4096).startswith(b"READY=1\n")
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        log = up.logs / "counter.console.log"
        deadline = time.monotonic() + 30
        while b"counter: " not in log.read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        log.rename(up.logs / "rotated.log")  # as logrotate would
        text = up.plan.read_text()
        up.plan.write_text(
            text.replace('memory = "8M"', 'memory = "16M"\nrestart = "restart"\nrestart_limit = 7')
        )
        up.proc.send_signal(signal.SIGHUP)
        reloading = manager.recv(4096).decode().split("\n")
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert manager.recv(4096).startswith(b"READY=1\n")
        parts = up.ps()  # still serving, the partition never stopped
        assert parts["counter"]["restart"] == "restart" and parts["counter"]["boots"] == 1
        assert parts["counter"]["memory"] == 8 << 20  # not applied
        events = wait_log(up, "reload: counter: memory changed: not applied")
        assert "reload: counter: restart = 'restart', restart_limit = 7" in events
        deadline = time.monotonic() + 30
        while not log.exists() or b"counter: " not in log.read_bytes():  # a new log begun
            assert time.monotonic() < deadline
            time.sleep(0.05)
        up.plan.write_text("not a plan [")
        up.proc.send_signal(signal.SIGHUP)
        assert manager.recv(4096).startswith(b"RELOADING=1\n")
        assert manager.recv(4096).startswith(b"READY=1\n")
        last = wait_log(up, "nothing changed").splitlines()[-1]
        assert "reload: " in last and "not valid TOML" in last and "nothing changed" in last
        assert up.cli("down").returncode == 0
        assert up.proc.wait(30) == 0
    finally:
        manager.close()
        status, _, err = up.close()
    assert "Traceback" not in err, err
