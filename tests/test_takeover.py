"""Live VMM upgrade: ``osvmm up PLAN --takeover`` takes every running partition of
the VMM serving the plan's control socket, their memory handed over as memfds,
not copied; the old VMM ends, the new one serves the socket, the guests go on
(needs /dev/kvm). And a takeover that cannot happen changes nothing."""

from __future__ import annotations

import re
import time

import pytest

from tests.helpers import guest_text, run_osvmm
from tests.test_supervisor_up import UpProcess

pytestmark = pytest.mark.kvm

EVERY = 1 << 23
PLAN = f"""
[[partition]]
name = "counter"
cpus = "floating"
memory = "16M"
image = "guests:counter"
cmdline = "every={EVERY}"

[[partition]]
name = "touch"
cpus = "floating"
memory = "{{touch_memory}}"
image = "guests:memtouch"
cmdline = "mib=8 wait_us=2000 every=50"

[[partition]]
name = "hello"
cpus = "floating"
memory = "4M"
image = "guests:hello"
"""


def lines(path, pattern: str) -> list[int]:
    """The numbers of the guest's lines; the VMM's notes taken out first (a takeover
    may note itself in the middle of a line the guest is writing)."""
    if not path.exists():
        return []
    return [int(n) for n in re.findall(pattern, guest_text(path))]


def wait_until(pred, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_new_vmm_takes_over_every_running_partition_without_copying_memory():
    old = UpProcess(PLAN.format(touch_memory="32M"))
    new_up = False
    try:
        old.wait_for(lambda p: p["counter"]["state"] == p["touch"]["state"] == "running")
        counter_log, touch_log = old.logs / "counter.console.log", old.logs / "touch.console.log"
        wait_until(lambda: len(lines(counter_log, r"counter: (\d+)\n")) >= 2)
        wait_until(lambda: len(lines(touch_log, r"memtouch: pass (\d+) ok")) >= 1)
        old_pid = old.proc.pid

        r = run_osvmm("up", "-d", str(old.plan), "--takeover", timeout=120)
        assert r.returncode == 0, r.stderr
        new_up = True
        assert old.proc.wait(30) == 0  # the old VMM ended by itself
        parts = old.ps()  # the same socket, the new VMM
        assert parts["counter"]["state"] == parts["touch"]["state"] == "running"
        assert parts["hello"]["state"] == "stopped"
        new_pid = int(re.search(rb"pid (\d+)", r.stderr).group(1))
        assert new_pid != old_pid
        log = (old.logs / "osvmm.log").read_text()
        assert re.search(
            r"took over 2 partitions from pid \d+ \(paused [\d.]+ ms, 0 bytes copied\)", log
        ), log
        # The guest memory the new VMM maps is a memfd it was handed.
        maps = open(f"/proc/{new_pid}/maps").read()
        assert "/memfd:osvmm-ram" in maps

        n_counter = len(lines(counter_log, r"counter: (\d+)\n"))
        n_touch = len(lines(touch_log, r"memtouch: pass (\d+) ok"))
        wait_until(lambda: len(lines(counter_log, r"counter: (\d+)\n")) >= n_counter + 2)
        wait_until(lambda: len(lines(touch_log, r"memtouch: pass (\d+) ok")) >= n_touch + 2)
        counts = lines(counter_log, r"counter: (\d+)\n")
        assert counts == [EVERY * (i + 1) for i in range(len(counts))], counts
        passes = lines(touch_log, r"memtouch: pass (\d+) ok")
        assert passes == [50 * (i + 1) for i in range(len(passes))], passes
        assert "holds" not in touch_log.read_text()  # no page lost (memtouch checks them all)
    finally:
        if new_up:
            run_osvmm("down", "--socket", old.sock)
        old.close()


def test_a_takeover_without_an_old_vmm_starts_nothing(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[vmm]\ncontrol_socket = "{tmp_path}/s.sock"\n' + PLAN.format(touch_memory="32M")
    )
    r = run_osvmm("up", str(plan), "--takeover")
    assert r.returncode == 2
    err = r.stderr.decode().splitlines()
    assert len(err) == 1 and "--takeover: no VMM is listening" in err[0], err
    assert not (tmp_path / "s.sock").exists()


def test_a_takeover_the_new_plan_cannot_hold_leaves_the_old_vmm_running():
    old = UpProcess(PLAN.format(touch_memory="32M"))
    try:
        old.wait_for(lambda p: p["counter"]["state"] == p["touch"]["state"] == "running")
        before = old.ps()
        other = old.dir / "other.toml"  # the same socket, but touch with other memory
        other.write_text(old.plan.read_text().replace('memory = "32M"', 'memory = "64M"'))
        r = run_osvmm("up", str(other), "--takeover", timeout=120)
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert len(err.splitlines()) == 1 and "touch" in err and "64 MiB" in err, err
        assert old.proc.poll() is None  # the old VMM goes on
        after = old.ps()
        for name in ("counter", "touch"):
            assert after[name]["state"] == "running"
            assert after[name]["boots"] == before[name]["boots"]  # the same runs
            assert after[name]["tids"] == before[name]["tids"]
    finally:
        old.close()
