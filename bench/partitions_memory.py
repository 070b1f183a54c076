"""Partitions per VMM: host memory of 1, 2, 4, 8 partitions in one osvmm process
against the same number of QEMU processes.

Every partition and every QEMU runs the bundled ``counter`` guest (64 MiB of
guest RAM, counting at CPL3 forever, a console line every 2^26 counts), so
all are running, not finished, when measured. A configuration is measured
once every guest has printed its first line (its set-up done, its pattern
written): /proc/<pid>/smaps_rollup of every VMM process is read 6 times,
50 ms apart, and the largest total is kept.

The metric is PSS (proportional set size): each resident page counted
divided by the number of processes mapping it. It charges N QEMU processes
once for the libraries and binary pages they share, and charges osvmm's one
process for its share of the interpreter's pages, so neither side is billed
twice for the same page; the sum of RSS is kept beside it in the JSON.
Kernel memory of the VMs (KVM's page tables, vCPU state) is not in either.

osvmm side: ``osvmm up PLAN`` (the supervisor: one process, one ``Kvm``
shared by N ``Partition`` objects), with N partitions of the plan's defaults
(floating CPUs, ``hugepages = "auto"``: no THP for a 64 MiB range, below
layout.HUGEPAGE_MIN_RANGE; no prefault) and 64 MiB each, as
QEMU's ``-m 64``; ready when its foreground echo has shown a line from every
partition; then SIGTERM. Goal: each extra partition under 2 MiB,
i.e. (PSS(8) - PSS(1)) / 7.
"""

from __future__ import annotations

import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cold_start import QEMU, child_env
from bench.common import Figure, Sample

COUNTS = (1, 2, 4, 8)
GUEST_ARGS = "every=67108864"  # a line every 2^26 counts: soon, then rarely
SAMPLES, INTERVAL = 6, 0.05
READY_TIMEOUT = 60.0


def smaps_rollup(pid: int) -> dict[str, int]:
    """The KiB fields of /proc/<pid>/smaps_rollup (Rss, Pss, ...)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def sample(pids: list[int]) -> tuple[float, float]:
    """Largest total (PSS MiB, RSS MiB) over SAMPLES reads of every pid."""
    best_pss = best_rss = 0.0
    for i in range(SAMPLES):
        if i:
            time.sleep(INTERVAL)
        rolls = [smaps_rollup(p) for p in pids]
        best_pss = max(best_pss, sum(r["Pss"] for r in rolls) / 1024)
        best_rss = max(best_rss, sum(r["Rss"] for r in rolls) / 1024)
    return best_pss, best_rss


def _readline(stream, deadline: float, what: str) -> bytes:
    """One line from a pipe, or RuntimeError at the deadline."""
    buf = b""
    fd = stream.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"{what}: no line within {READY_TIMEOUT:.0f} s")
        chunk = stream.read1(1) if hasattr(stream, "read1") else stream.read(1)
        if not chunk:
            raise RuntimeError(f"{what}: ended before its first line ({buf!r})")
        buf += chunk
    return buf


def plan_text(n: int, image: str, sock: str, logs: str, thp: bool = True) -> str:
    """An ``osvmm up`` plan of ``n`` counter partitions, 64 MiB each, plan defaults
    (but ``hugepages = false`` when not ``thp``)."""
    parts = [f'[vmm]\ncontrol_socket = "{sock}"\nlog_dir = "{logs}"\n']
    for i in range(n):
        parts.append(
            f'[[partition]]\nname = "p{i}"\ncpus = "floating"\nmemory = "64M"\n'
            f'image = "{image}"\ncmdline = "{GUEST_ARGS}"\n'
            + ("" if thp else "hugepages = false\n")
        )
    return "\n".join(parts)


def measure_osvmm(image: str, n: int, thp: bool = True) -> tuple[float, float]:
    """``osvmm up`` with n partitions, measured once each has printed a console line."""
    with tempfile.TemporaryDirectory(prefix="osvmm-bench-", dir="/tmp") as tmp:
        plan = Path(tmp) / "plan.toml"
        plan.write_text(plan_text(n, image, f"{tmp}/ctl.sock", f"{tmp}/logs", thp))
        cmd = [sys.executable, "-m", "osvmm.cli", "up", str(plan)]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        try:
            # The foreground supervisor echoes each console line as "NAME | line".
            waiting = {f"p{i}" for i in range(n)}
            deadline = time.monotonic() + READY_TIMEOUT
            while waiting:
                line = _readline(proc.stdout, deadline, f"osvmm up with {n}").decode()
                waiting.discard(line.split(" ", 1)[0])
            return sample([proc.pid])
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            if proc.returncode not in (0, -signal.SIGTERM):
                msg = err.decode(errors="replace").strip()[-300:]
                raise RuntimeError(f"osvmm up with {n} partitions exited {proc.returncode}: {msg}")


def measure_qemu(image: str, n: int) -> tuple[float, float]:
    procs = []
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [*QEMU, "-kernel", image, "-append", GUEST_ARGS],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + READY_TIMEOUT
        for p in procs:
            _readline(p.stdout, deadline, "QEMU counter guest")
        return sample([p.pid for p in procs])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
            p.stdout.close()


def run(repeats: int = 3) -> list[Figure]:
    from osvmm.guests.build import guest_path

    image = str(guest_path("counter"))
    has_qemu = shutil.which(QEMU[0]) is not None
    osv = {n: [] for n in COUNTS}  # n -> [(pss, rss)]
    nothp = {n: [] for n in (COUNTS[0], COUNTS[-1])}
    qem = {n: [] for n in COUNTS}
    for _ in range(repeats):
        for n in COUNTS:
            osv[n].append(measure_osvmm(image, n))
            if n in nothp:
                nothp[n].append(measure_osvmm(image, n, thp=False))
            if has_qemu:
                qem[n].append(measure_qemu(image, n))
    return figures(osv, qem if has_qemu else None, nothp)


def figures(osv: dict, qem: dict | None, nothp: dict | None = None) -> list[Figure]:
    """Figures from per-count lists of (PSS MiB, RSS MiB), one pair per repeat;
    ``nothp`` has the first and last counts measured with ``hugepages = false``."""
    figs = []
    for n in COUNTS:
        f = Figure(
            f"memory of {n} partition{'s' if n > 1 else ''}: one osvmm process (PSS)",
            "MiB",
            Sample.of([p for p, _ in osv[n]]),
            f"{n} QEMU process{'es' if n > 1 else ''} (sum of PSS)" if qem else None,
            Sample.of([p for p, _ in qem[n]]) if qem else None,
        )
        f.extra = {"osvmm_rss_mib": [r for _, r in osv[n]]}
        if qem:
            f.extra["qemu_rss_sum_mib"] = [r for _, r in qem[n]]
        figs.append(f)
    lo, hi = COUNTS[0], COUNTS[-1]

    def per_extra(runs):
        pairs = zip(runs[lo], runs[hi], strict=True)
        return Sample.of([(b[0] - a[0]) / (hi - lo) for a, b in pairs])

    extra = Figure(
        "each extra partition: osvmm (PSS)",
        "MiB",
        per_extra(osv),
        "each extra QEMU process" if qem else None,
        per_extra(qem) if qem else None,
        goal="< 2 MiB",
        notes=f"(PSS with {hi} - PSS with {lo}) / {hi - lo}, per repeat; plan defaults: "
        'hugepages = "auto", which leaves a 64 MiB partition in 4 KiB pages (with THP each '
        "2 MiB range the guest touches would be a whole 2 MiB huge page)",
    )
    extra.met = extra.value.median < 2
    figs.append(extra)
    if nothp:
        small = Figure(
            "each extra partition: osvmm, `hugepages = false` (PSS)",
            "MiB",
            per_extra(nothp),
            extra.baseline_name,
            extra.baseline,
            goal="< 2 MiB",
            notes="the same without THP on guest RAM: what the VMM itself adds per partition",
        )
        small.met = small.value.median < 2
        figs.append(small)
    return figs


if __name__ == "__main__":
    for fig in run(1):
        print(fig.name, fig.value, fig.baseline, fig.ratio, fig.notes)
