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

osvmm side: until the supervisor (``osvmm up``) lands, the VMM is a child
process of this module (``--serve N IMAGE``) that does what the supervisor
does: one ``Kvm`` shared by N ``Partition`` objects, built, started, and
running until its stdin closes. Goal: each extra partition under 2 MiB,
i.e. (PSS(8) - PSS(1)) / 7.
"""

from __future__ import annotations

import select
import shutil
import subprocess
import sys
import threading
import time

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


def measure_osvmm(image: str, n: int) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "bench.partitions_memory", "--serve", str(n), image]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env()
    )
    try:
        line = _readline(proc.stdout, time.monotonic() + READY_TIMEOUT, f"osvmm with {n}")
        if line.strip() != b"ready":
            raise RuntimeError(f"osvmm with {n} partitions: {line!r}")
        return sample([proc.pid])
    finally:
        _, err = proc.communicate(b"", timeout=30)  # EOF on stdin: the VMM stops
        if proc.returncode != 0:
            raise RuntimeError(f"osvmm with {n} partitions exited {proc.returncode}: {err[-300:]}")


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
    qem = {n: [] for n in COUNTS}
    for _ in range(repeats):
        for n in COUNTS:
            osv[n].append(measure_osvmm(image, n))
            if has_qemu:
                qem[n].append(measure_qemu(image, n))
    return figures(osv, qem if has_qemu else None)


def figures(osv: dict, qem: dict | None) -> list[Figure]:
    """Figures from per-count lists of (PSS MiB, RSS MiB), one pair per repeat."""
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
        notes=f"(PSS with {hi} - PSS with {lo}) / {hi - lo}, per repeat",
    )
    extra.met = extra.value.median < 2
    figs.append(extra)
    return figs


# -- the VMM side: N partitions in this process, as the supervisor runs them ---------


def serve(n: int, image: str) -> int:
    from osvmm.kvm import Kvm
    from osvmm.partition import Partition, PartitionConfig

    kvm = Kvm()
    lines = [threading.Event() for _ in range(n)]

    def sink(event):
        return lambda data: event.set() if b"\n" in data else None

    parts = [
        Partition(
            PartitionConfig(
                name=f"p{i}",
                image=image,
                cmdline=GUEST_ARGS,
                console=sink(lines[i]),
                partition_id=i,
            ),
            kvm,
        ).build()
        for i in range(n)
    ]
    for p in parts:
        p.start()
    deadline = time.monotonic() + READY_TIMEOUT
    for i, (p, ev) in enumerate(zip(parts, lines, strict=True)):
        if not ev.wait(max(0.0, deadline - time.monotonic())):
            print(f"partition {i} printed no line (result {p.result})", flush=True)
            return 1
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes it
    for p in parts:
        p.stop()
    for p in parts:
        p.wait(5)
        p.close()
    kvm.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        sys.exit(serve(int(sys.argv[2]), sys.argv[3]))
    for fig in run(1):
        print(fig.name, fig.value, fig.baseline, fig.ratio, fig.notes)
