"""Density: peak RSS of one ``osvmm up`` process running 1, 2, 4 and 8 small
partitions, and what each partition after the first adds beyond its guest
memory actually touched.

Every partition is floating (this host has 2 CPUs), 4 MiB, and runs the
bundled ``counter`` guest, which counts at CPL3 forever and prints a line
every 2^26 counts. Once every partition has printed its first line, the VMM
process's peak RSS (VmHWM, /proc/<pid>/status) and the resident memory of
every guest-memory mapping (Rss in /proc/<pid>/smaps, at the host addresses
``osvmm ps --json`` reports) are read. The VMM's own memory is peak RSS
minus touched guest memory; the figure is
``(own(N) - own(1)) / (N - 1)`` for N = 8, beside 2 and 4 in ``extra``.
Goal: under 2 MiB per partition after the first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Figure, Sample, env

COUNTS = (1, 2, 4, 8)
PARTITION = """
[[partition]]
name = "p{i}"
cpus = "floating"
memory = "4M"
image = "guests:counter"
cmdline = "every=0x4000000"
"""


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure(n: int) -> dict:
    """One ``osvmm up`` with ``n`` partitions: peak RSS, guest RSS, own memory (KiB)."""
    from osvmm.vmm.enforce import mapping_flags

    tmp = Path(tempfile.mkdtemp(prefix="osvmm-density-", dir="/tmp"))
    sock = tmp / "s"
    plan = tmp / "plan.toml"
    plan.write_text(
        f'[vmm]\ncontrol_socket = "{sock}"\nlog_dir = "{tmp}/logs"\n'
        + "".join(PARTITION.format(i=i) for i in range(n))
    )
    cli = [sys.executable, "-m", "osvmm.cli"]
    proc = subprocess.Popen(
        [*cli, "up", "--quiet", str(plan)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env(),
        cwd=str(REPO),
    )
    try:
        deadline = time.monotonic() + 60
        logs = [tmp / "logs" / f"p{i}.console.log" for i in range(n)]
        while not all(p.exists() and b"counter:" in p.read_bytes() for p in logs):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{n} partitions: not every guest printed its first line")
            time.sleep(0.05)
        ps = subprocess.run(
            [*cli, "ps", "--json", "--socket", str(sock)], capture_output=True, env=env()
        )
        parts = json.loads(ps.stdout)["partitions"]
        # Adjacent guest mappings alike in every flag are one VMA: count each VMA once.
        vmas = {}
        for p in parts:
            for addr in p["memory_host_addrs"]:
                m = mapping_flags(proc.pid, addr)
                vmas[m["start"]] = m.get("rss_kb", 0)
        guest = sum(vmas.values())
        hwm = _status_kib(proc.pid, "VmHWM")
        rss = _status_kib(proc.pid, "VmRSS")
        subprocess.run([*cli, "down", "--socket", str(sock)], capture_output=True, env=env())
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"partitions": n, "peak_rss_kib": hwm, "rss_kib": rss, "guest_kib": guest}


def run(repeats: int = 3) -> list[Figure]:
    results = {n: [measure(n) for _ in range(repeats)] for n in COUNTS}

    def own(r: dict) -> float:
        return (r["peak_rss_kib"] - r["guest_kib"]) / 1024

    base = [own(r) for r in results[1]]
    per_extra = {}
    for n in COUNTS[1:]:
        per_extra[n] = [(own(r) - min(base)) / (n - 1) for r in results[n]]
    for n in COUNTS:
        r = results[n][0]
        print(
            f"density: {n} partitions: peak RSS {r['peak_rss_kib'] / 1024:.1f} MiB, "
            f"{r['peak_rss_kib'] / 1024 / n:.1f} MiB per partition, guest memory touched "
            f"{r['guest_kib'] / 1024:.1f} MiB, VMM's own {own(r):.1f} MiB",
            file=sys.stderr,
        )
    fig = Figure(
        "VMM memory per partition after the first (8 floating 4 MiB partitions, one process)",
        "MiB",
        Sample.of(per_extra[8]),
        baseline_name="peak RSS of the VMM with 1 partition",
        baseline=Sample.of([r["peak_rss_kib"] / 1024 for r in results[1]]),
        goal="< 2 MiB",
        notes="peak RSS (VmHWM) minus the guest memory actually touched (smaps Rss of the "
        "guest mappings), (own(8) - own(1)) / 7; per N in extra",
        extra={
            "per_extra_partition_mib": {n: Sample.of(v).__dict__ for n, v in per_extra.items()},
            "runs": {n: v for n, v in results.items()},
        },
    )
    fig.met = fig.value.median < 2
    return [fig]


if __name__ == "__main__":
    for f in run(repeats=1):
        print(f.name, f.value, f.met)
