"""A Linux partition keeps counting across a snapshot, a restore and a live migration,
inside the rig (scripts/hwvirt-rig, docs/testing.md).

Debian's stock kernel (the vmlinux scripts/fetch-debian-kernel caches) boots
under ``osvmm up`` to osvmm's busybox initramfs, whose ``osvmm.run`` script
counts: one ``COUNT N UPTIME`` line, then a short sleep, for ever. One
scenario (``scenario``), each step under an ``osvmm up`` of its own, each
partition on an L1 CPU of its own (``hugepages = false``, as in
tests/test_rig_linux.py):

1. ``src`` (L1 CPU 1) boots the counter; ``osvmm snapshot counter DIR --stop``
   writes it and stops it.
2. ``res`` (L1 CPU 2) resumes the snapshot (the plan's ``restore`` key); its
   count must go on from the source's last line, without a gap or a repeat,
   and its clock with it: the uptime never goes back, does not jump, and the
   loop's sleeps keep ending (timers fire).
3. ``dst`` (L1 CPU 3) is an ``osvmm up --incoming unix:...``; ``osvmm migrate``
   moves the resumed partition there live; the count goes on there the same
   way, and ``res`` shows its partition stopped, migrated.

The guest may be paused in the middle of a line: its first part ends one
console log, the rest begins the next, so the logs are read joined.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import REPO, guest_text, run_osvmm
from tests.test_rig_linux import BOOT_TIMEOUT, VMLINUX, wait_for

pytestmark = pytest.mark.rig

SLEEP_S = 0.5  # the loop's sleep between two lines
HOLD_S = 15  # the restore starts at least this long after the snapshot (host time)
LOOP = (
    "i=0; while true; do i=$((i+1)); read up idle < /proc/uptime; "
    f"echo COUNT $i $up; sleep {SLEEP_S}; done"
)
CPUS = {"src": "1", "res": "2", "dst": "3"}  # L1's CPU 0 for the VMMs and L1 itself
MEMORY = "128M"
AFTER = 6  # lines each step must see after the previous one
LINE = re.compile(r"COUNT (\d+) ([\d.]+)\n")


def plan_text(tmp: Path, side: str, initrd: Path, restore: Path | None = None) -> str:
    cmdline = f'console=ttyS0 quiet osvmm.run="{LOOP}"'
    return (
        f'[vmm]\ncontrol_socket = "{tmp}/{side}.sock"\nlog_dir = "{tmp}/{side}-logs"\n\n'
        f'[[partition]]\nname = "counter"\ncpus = "{CPUS[side]}"\nmemory = "{MEMORY}"\n'
        f'hugepages = false\nkernel = "{VMLINUX}"\ninitrd = "{initrd}"\n'
        f"cmdline = {json.dumps(cmdline)}\n"  # a JSON string is a TOML one
        + (f'restore = "{restore}"\n' if restore is not None else "")
    )


def up_process(plan: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OSVMM_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "osvmm.cli", "up", str(plan), "-q", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=str(REPO),
    )


def counts(text: str) -> list[tuple[int, float]]:
    return [(int(n), float(up)) for n, up in LINE.findall(text)]


@dataclass
class Scenario:
    tmp: Path
    snapshot: str = ""  # osvmm snapshot's output
    migrate: str = ""  # osvmm migrate's output
    res_ps: dict = field(default_factory=dict)  # the resumed partition after the migration
    error: str = ""
    timings: dict = field(default_factory=dict)

    def log(self, side: str) -> str:
        path = self.tmp / f"{side}-logs" / "counter.console.log"
        return guest_text(path).replace("\r", "") if path.exists() else ""

    def require(self) -> None:
        if self.error:
            pytest.fail(f"the scenario stopped: {self.error}")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, request) -> Scenario:
    from osvmm.boot.initramfs import build_initramfs

    if not VMLINUX.exists():
        pytest.skip(f"no Debian kernel at {VMLINUX}: run scripts/fetch-debian-kernel")
    assert (os.cpu_count() or 1) >= 4, (
        "the scenario needs 4 CPUs in L1: scripts/hwvirt-rig run --cpus 5"
    )
    tmp = Path(str(tmp_path_factory.mktemp("snap")))
    initrd = build_initramfs(tmp / "initrd.cpio")
    snap = tmp / "snap"
    for side in ("src", "res", "dst"):
        (tmp / f"{side}.toml").write_text(
            plan_text(tmp, side, initrd, snap if side == "res" else None)
        )
    sc = Scenario(tmp)
    procs: dict[str, subprocess.Popen] = {}
    start = time.monotonic()

    def mark(name: str) -> None:
        sc.timings[name] = round(time.monotonic() - start)

    def lines(side: str, at_least: int, timeout: float = 300) -> None:
        def ended() -> str | None:
            for name, p in procs.items():
                if p.poll() is not None:
                    return f"osvmm up ({name}) ended: {p.stderr.read().decode(errors='replace')}"
            return None

        wait_for(
            f"{at_least} lines on {side}'s console",
            lambda: len(counts(sc.log(side))) >= at_least,
            timeout,
            abort=ended,
        )

    try:
        procs["src"] = up_process(tmp / "src.toml")
        lines("src", 3, BOOT_TIMEOUT)
        mark("src counting")
        r = run_osvmm(
            "snapshot", "counter", str(snap), "--stop", "--socket", f"{tmp}/src.sock", timeout=300
        )
        sc.snapshot = (r.stdout + r.stderr).decode(errors="replace")
        assert r.returncode == 0, sc.snapshot
        mark("snapshot")
        snapped = time.monotonic()
        before = len(counts(sc.log("src")))
        procs.pop("src").send_signal(signal.SIGTERM)

        # Long enough that a guest clock that followed the host's would jump.
        time.sleep(max(0.0, HOLD_S - (time.monotonic() - snapped)))
        procs["res"] = up_process(tmp / "res.toml")
        lines("res", AFTER)
        mark("restored counting")
        procs["dst"] = up_process(tmp / "dst.toml", "--incoming", f"unix:{tmp}/in.sock")
        wait_for("the destination's socket", lambda: (tmp / "in.sock").exists(), 120)
        r = run_osvmm(
            "migrate",
            "counter",
            "--to",
            f"unix:{tmp}/in.sock",
            "--socket",
            f"{tmp}/res.sock",
            timeout=300,
        )
        sc.migrate = (r.stdout + r.stderr).decode(errors="replace")
        assert r.returncode == 0, sc.migrate
        mark("migrated")
        lines("dst", AFTER)
        mark("destination counting")
        ps = run_osvmm("ps", "--json", "--socket", f"{tmp}/res.sock", timeout=300)
        assert ps.returncode == 0, ps.stderr.decode(errors="replace")
        sc.res_ps = next(p for p in json.loads(ps.stdout)["partitions"] if p["name"] == "counter")
        assert before >= 3
    except AssertionError as err:
        sc.error = str(err) + "".join(
            f"\n{side}: ...{sc.log(side)[-400:]!r}" for side in ("src", "res", "dst")
        )
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    sc.timings["total"] = round(time.monotonic() - start)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown without -s: each step's time
        print(f"\nsnapshot scenario: {sc.timings}")
        for first, second in (("src", "res"), ("res", "dst")):
            n = len(counts(sc.log(first)))
            lines = counts(sc.log(first) + sc.log(second))[max(0, n - 2) : n + 3]
            print(f"  {first} -> {second}: (count, uptime) around the hand-over: {lines}")
    return sc


def check_continues(first: str, second: str) -> tuple[list, list]:
    """The count of ``second`` goes on from ``first``'s last line, one by one, and
    its uptime with it; (the lines before the hand-over, those from its last on)."""
    whole = counts(first + second)
    n = len(counts(first))
    assert n >= 3 and len(whole) >= n + AFTER - 1, whole
    numbers = [c for c, _ in whole]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    ups = [u for _, u in whole]
    assert all(b >= a for a, b in zip(ups, ups[1:], strict=False)), ups
    return whole[:n], whole[n - 1 :]


def check_clock(before: list[tuple[int, float]], after: list[tuple[int, float]]) -> None:
    """The guest's clock goes on across the hand-over without a jump (its TSC and
    KVM clock are the snapshot's: the time the partition did not run is not
    counted) and keeps running: each sleep of the loop ends, and the uptime
    advances by at least the sleeps since."""
    ups = [u for _, u in before]
    step = max(b - a for a, b in zip(ups, ups[1:], strict=False))  # the slowest line
    # The hand-over lies between the last whole line before it and one of the next
    # two (a line cut by the pause, or whose uptime was read before it, comes after).
    gap = max(b - a for (_, a), (_, b) in zip(after[:3], after[1:4], strict=True))
    assert gap <= min(2 * step + 1, HOLD_S - 1), (gap, step, after[:4])
    later = [u for _, u in after[1:]]
    assert later[-1] - later[0] >= SLEEP_S * (len(later) - 1) * 0.9, later


def test_snapshot_stops_the_source(scenario):
    scenario.require()
    assert re.search(
        r"counter: snapshot in .*: \d+ KiB of 128 MiB memory stored, paused [\d.]+ ms; stopped",
        scenario.snapshot,
    ), scenario.snapshot


def test_the_restored_count_goes_on_without_gap_or_repeat(scenario):
    scenario.require()
    check_clock(*check_continues(scenario.log("src"), scenario.log("res")))


def test_the_migrated_count_goes_on_without_gap_or_repeat(scenario):
    scenario.require()
    assert re.search(
        r"counter: migrated to unix:.* downtime [\d.]+ ms; here stopped", scenario.migrate
    )
    check_clock(*check_continues(scenario.log("res"), scenario.log("dst")))


def test_the_migrated_source_is_stopped(scenario):
    scenario.require()
    assert scenario.res_ps["state"] == "stopped", scenario.res_ps
    assert scenario.res_ps["reason"].startswith("migrated to unix:"), scenario.res_ps
