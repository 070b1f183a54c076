"""``osvmm top``: its frame from two samples (no /dev/kvm), and the live view
driven in tmux against a real ``osvmm up``, its screen read with ``tmux
capture-pane``: a row per partition, refreshing as a partition stops, rates
that are numbers, ``q`` ending it with status 0 (needs /dev/kvm and tmux)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from osvmm.up.top import frame
from tests.helpers import REPO


def partition(name: str, state: str, **kw) -> dict:
    p = {
        "name": name,
        "state": state,
        "cpus": "floating",
        "pool": "0-1",
        "vcpus": 1,
        "memory": 8 << 20,
        "restarts": 0,
        "boots": 1,
        "uptime_s": 75.0,
    }
    return p | kw


def counters(exits: int, io: int, hcalls: int) -> dict:
    return {"exits": exits, "io": io, "mmio": 0, "other": 0, "hcalls": hcalls}


def test_the_frame_shows_rates_between_two_samples():
    vmm = {
        "pid": 42,
        "plan": "/etc/osvmm/plan.toml",
        "partitions": [
            partition("web", "running", cpus="2-3", vcpus=2, memory=1 << 30, restarts=2),
            partition("db", "stopped", uptime_s=None),
        ],
    }
    before = {"web": counters(1000, 100, 10), "db": counters(5, 5, 0)}
    now = {"web": counters(3000, 300, 50), "db": counters(5, 5, 0)}
    lines = frame(vmm, now, before, 2.0).splitlines()
    assert lines[0].startswith("osvmm top - pid 42, 2 partitions, plan plan.toml")
    assert lines[2].split() == [
        *("NAME", "STATE", "CPUS", "VCPU", "MEM", "EXITS/s", "IO/s", "MMIO/s"),
        *("OTHER/s", "HCALL/s", "RESTARTS", "BOOTS", "UPTIME"),
    ]
    assert lines[3].split() == [
        *("web", "running", "2-3", "2", "1G", "1000", "100", "0", "0", "20", "2", "1", "0:01:15"),
    ]
    assert lines[4].split() == [
        *("db", "stopped", "~0-1", "1", "8M", "0", "0", "0", "0", "0", "0", "1", "-"),
    ]
    first = frame(vmm, now, None, 0).splitlines()  # one sample: no rates yet
    assert first[3].split()[5:10] == ["-"] * 5


TMUX = shutil.which("tmux")


@pytest.mark.kvm
@pytest.mark.skipif(TMUX is None, reason="needs tmux (setup.sh installs it)")
def test_top_in_tmux_refreshes_and_quits_on_q():
    from tests.test_supervisor_up import PLAN, UpProcess

    up = UpProcess(PLAN.replace("every=0x4000000", "every=0x100000"))
    server = f"osvmm-top-{os.getpid()}"
    tmux = [TMUX, "-L", server, "-f", "/dev/null"]
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        status = up.dir / "top.status"  # its exit status, as the shell in the pane saw it
        cmd = (
            f"PYTHONPATH={REPO} {sys.executable} -m osvmm.cli top --socket {up.sock} "
            f"--interval 0.5; echo $? > {status}"
        )
        subprocess.run(
            [*tmux, "new-session", "-d", "-s", "top", "-x", "150", "-y", "20", cmd], check=True
        )
        subprocess.run([*tmux, "set-option", "-t", "top", "remain-on-exit", "on"], check=True)

        def screen() -> str:
            r = subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True)
            return r.stdout.decode()

        def wait_screen(pred, what: str) -> str:
            deadline = time.monotonic() + 30
            while not pred(text := screen()):
                assert time.monotonic() < deadline, f"{what}:\n{text}"
                time.sleep(0.2)
            return text

        def row(text: str, name: str) -> list[str]:
            return next(line.split() for line in text.splitlines() if line.startswith(name + " "))

        text = wait_screen(
            lambda t: "counter " in t and re.search(r"^counter\s+running.*\s\d+\s", t, re.M),
            "no row for counter with rates",
        )
        assert re.search(r"osvmm top - pid \d+, 2 partitions", text), text
        assert "NAME" in text and "EXITS/s" in text and "HCALL/s" in text
        assert row(text, "hello")[1] == "stopped"
        wait_screen(
            lambda t: row(t, "counter")[6].isdigit() and int(row(t, "counter")[6]) > 0,
            "counter's port I/O exits per second never above 0",
        )
        r = up.cli("top", "--once", "--interval", "0.3")  # for scripts: one frame, then the end
        assert r.returncode == 0, r.stderr
        frame_lines = r.stdout.decode().splitlines()
        assert frame_lines[2].split()[0] == "NAME" and "\x1b" not in r.stdout.decode()
        assert [line.split()[0] for line in frame_lines[3:]] == ["counter", "hello"]
        r = up.cli("stop", "counter")
        assert r.returncode == 0, r.stderr
        wait_screen(lambda t: row(t, "counter")[1] == "stopped", "the stop never showed")
        subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True)
        deadline = time.monotonic() + 10
        while not status.exists() or not status.read_text().endswith("\n"):
            assert time.monotonic() < deadline, screen()
            time.sleep(0.1)
        assert status.read_text() == "0\n"  # q ended it, status 0
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        up.close()
