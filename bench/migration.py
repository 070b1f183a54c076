"""Live migration: total time, downtime, rounds and bytes, between two VMMs in process.

Two supervisors in this process, as two ``osvmm up`` would run them: the source
runs the partition, the destination accepts migrations on a Unix socket
(``IncomingServer``); one figure per guest is the control request's answer
(``MigrationService.migrate``: from the request until the destination runs it):

- ``counter`` in 256 MiB (the issue's size): a guest that writes one page (its
  count) all the time;
- ``memtouch`` in 256 MiB rewriting 24 MiB pass after pass (a 2 ms pause between
  passes): the pre-copy rounds have to chase it.

The dirty log is what ``osvmm up`` gives (the dirty ring where the host has it;
OSVMM_DIRTY_RING=0 in the environment measures the bitmap); the notes say which.

Baseline for the downtime, same run: moving the same partition offline with a
snapshot, the partition paused while it is written (``Partition.snapshot``) and
then restored in the destination's process until it runs again
(``Partition.build`` + ``start``); what a migration saves is that second half.

Live upgrade: ``osvmm up -d --takeover`` of an ``osvmm up -d`` running both
guests; the figure is the pause the new VMM logs (from pausing every partition
in the old VMM to all running in the new one) and the guest memory copied (0:
memfds are handed over), against the memtouch migration's downtime above.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.common import Figure, Sample

MEMORY_MIB = 256  # each migrated partition's
GUESTS = {
    "counter": ("guests:counter", ""),
    "memtouch 24 MiB": ("guests:memtouch", "mib=24 wait_us=2000 every=1000000"),
}


def _plan(tmp: Path, side: str, image: str, cmdline: str):
    from osvmm.plan.config import parse_plan
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology

    body = (
        f'[vmm]\ncontrol_socket = "{tmp}/{side}.sock"\n[[partition]]\nname = "p"\n'
        f'cpus = "floating"\nmemory = "{MEMORY_MIB}M"\nimage = "{image}"\ncmdline = "{cmdline}"\n'
    )
    return place(parse_plan(body, tmp), read_topology())


def _wait_running(sup, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while sup.partitions["p"].state != "running":
        if time.monotonic() > deadline:
            raise RuntimeError(f"not running: {sup.partitions['p'].reason}")
        time.sleep(0.01)


def migrate_once(tmp: Path, image: str, cmdline: str) -> dict:
    from osvmm.up.hypercalls import serve_supervisor
    from osvmm.up.migrate import IncomingServer, MigrationService
    from osvmm.up.supervisor import Supervisor

    src = Supervisor(_plan(tmp, "src", image, cmdline))
    dst = Supervisor(_plan(tmp, "dst", image, cmdline))
    lives = [serve_supervisor(src), serve_supervisor(dst)]
    addr = f"unix:{tmp}/in.sock"
    receiver = IncomingServer(addr, dst, dst.kvm)
    receiver.start()
    try:
        src.start_all()
        _wait_running(src)
        time.sleep(0.5)
        answer = MigrationService(src, lives[0]).migrate(
            {"name": "p", "to": addr, "downtime_ms": 300}
        )
        _wait_running(dst)
        return answer
    finally:
        receiver.close()
        src.close()
        dst.close()
        for live in lives:
            live.close()


def offline_once(tmp: Path, image: str, cmdline: str) -> float:
    """ms the partition does not run when moved with a snapshot instead."""
    from osvmm.guests import resolve_image
    from osvmm.machine import Machine
    from osvmm.vmm.partition import Partition, PartitionConfig

    machine = Machine.build(64 << 20, 1)
    config = PartitionConfig(machine, image=resolve_image(image), cmdline=cmdline)
    part = Partition(config).build()
    directory = tmp / "snap"
    try:
        part.start()
        time.sleep(0.5)
        _, paused_ms = part.snapshot(str(directory), then=part.stop)
        part.wait(10)
    finally:
        part.close()
    t0 = time.perf_counter()
    back = Partition(PartitionConfig(machine, restore=str(directory), restore_lazy=False)).build()
    back.start()
    restore_ms = (time.perf_counter() - t0) * 1000
    back.stop()
    back.wait(10)
    back.close()
    shutil.rmtree(directory)
    return paused_ms + restore_ms


def run(repeats: int = 3) -> list[Figure]:
    tmp = Path(tempfile.mkdtemp(prefix="osvmm-bench-mig-", dir="/tmp"))
    figures = []
    try:
        for label, (image, cmdline) in GUESTS.items():
            answers = [migrate_once(tmp, image, cmdline) for _ in range(repeats)]
            offline = [offline_once(tmp, image, cmdline) for _ in range(repeats)]
            rounds = Sample.of([a["rounds"] for a in answers])
            mib = Sample.of([a["bytes"] / (1 << 20) for a in answers])
            figures.append(
                Figure(
                    f"migrate {label} ({MEMORY_MIB} MiB): downtime",
                    "ms",
                    Sample.of([a["downtime_ms"] for a in answers]),
                    "offline move (snapshot paused + restore)",
                    Sample.of(offline),
                    goal="<= 300 ms (the default target)",
                    notes=f"{answers[0]['dirty_log']}, "
                    f"rounds {rounds.median:g} [{rounds.min:g}, {rounds.max:g}], "
                    f"{mib.median:.1f} MiB sent, pages at the stop "
                    f"{Sample.of([a['stop_pages'] for a in answers]).median:g}",
                    extra={"answers": answers},
                )
            )
            figures[-1].met = figures[-1].value.median <= 300
            figures.append(
                Figure(
                    f"migrate {label} ({MEMORY_MIB} MiB): total",
                    "ms",
                    Sample.of([a["total_ms"] for a in answers]),
                )
            )
        figures.append(run_takeover(tmp, repeats, [a["downtime_ms"] for a in answers]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


def takeover_once(tmp: Path) -> dict:
    """``osvmm up -d --takeover`` of a running ``osvmm up -d`` with the two guests;
    what the new VMM logged: paused ms, bytes copied."""
    import re
    import subprocess

    from bench.common import env, osvmm_cmd

    parts = "".join(
        f'[[partition]]\nname = "p{i}"\ncpus = "floating"\nmemory = "64M"\n'
        f'image = "{image}"\ncmdline = "{cmdline}"\n'
        for i, (image, cmdline) in enumerate(GUESTS.values())
    )
    plan = tmp / "plan.toml"
    plan.write_text(f'[vmm]\ncontrol_socket = "{tmp}/up.sock"\nlog_dir = "{tmp}/logs"\n{parts}')
    run = dict(capture_output=True, env=env(), timeout=120, stdin=subprocess.DEVNULL)
    subprocess.run(osvmm_cmd("up", "-d", str(plan)), check=True, **run)
    try:
        time.sleep(1)
        t0 = time.perf_counter()
        subprocess.run(osvmm_cmd("up", "-d", str(plan), "--takeover"), check=True, **run)
        wall = (time.perf_counter() - t0) * 1000
    finally:
        subprocess.run(osvmm_cmd("down", "--socket", f"{tmp}/up.sock"), **run)
    log = (tmp / "logs" / "osvmm.log").read_text()
    m = re.search(r"took over (\d+) partitions .*\(paused ([\d.]+) ms, (\d+) bytes copied\)", log)
    shutil.rmtree(tmp / "logs")
    return {
        "partitions": int(m.group(1)),
        "paused_ms": float(m.group(2)),
        "copied": int(m.group(3)),
        "wall_ms": wall,
    }


def run_takeover(tmp: Path, repeats: int, migrations: list[float]) -> Figure:
    takes = [takeover_once(tmp) for _ in range(repeats)]
    return Figure(
        "live upgrade (osvmm up --takeover) of 2 partitions of 64 MiB: paused",
        "ms",
        Sample.of([t["paused_ms"] for t in takes]),
        "migration downtime of the memtouch one alone (memory copied)",
        Sample.of(migrations),
        notes=f"{takes[-1]['copied']} bytes of guest memory copied; the whole command "
        f"{Sample.of([t['wall_ms'] for t in takes]).median:.0f} ms (a new Python process, "
        "the plan checked, the old VMM gone)",
        extra={"takeovers": takes},
    )
