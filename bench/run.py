"""Run every benchmark; write bench/out/results.json and bench/out/results.md.

    python3 -m bench.run [--quick] [--only NAME ...] [--out DIR]

Each figure is the median of repeated runs with min and max, beside its
baseline measured in the same run, and the ratio. Benchmarks install nothing:
./setup.sh does that. Figures are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

# name -> module with run(**kwargs) -> list[Figure]; quick settings for --quick.
BENCHMARKS = {
    "exit_roundtrip": ("bench.exit_roundtrip", {"n": 10000, "repeats": 3}),
    "linux_prepare": ("bench.linux_prepare", {"repeats": 3}),
    "cold_start": ("bench.cold_start", {"repeats": 3}),
    "warm_start": ("bench.warm_start", {"repeats": 5}),
    "partitions_memory": ("bench.partitions_memory", {"repeats": 1}),
    "dedicated_exits": ("bench.dedicated_exits", {"repeats": 2, "window": 0.5}),
    "density": ("bench.density", {"repeats": 1}),
    "hypercall": ("bench.hypercall", {"n": 5000, "rounds": 200, "stream_mib": 64, "repeats": 1}),
    "snapshot": ("bench.snapshot", {"repeats": 2, "big": 256 << 20}),
    "migration": ("bench.migration", {"repeats": 1}),
    "api": ("bench.api", {"n": 100, "repeats": 1}),
    "write_monitor": (
        "bench.write_monitor",
        {"n": 5000, "iters": 50_000_000, "repeats": 1, "everies": (10_000, 1_000_000)},
    ),
}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    py = platform.python_version()
    return f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python {py}"


def fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def markdown(figures, when: str, host: str) -> str:
    lines = [
        f"Measured {when} on {host}.",
        "",
        "| figure | value (median [min, max]) | baseline | ratio | goal |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        v = f.value
        value = f"{fmt(v.median)} {f.unit} [{fmt(v.min)}, {fmt(v.max)}]"
        if f.baseline is not None:
            b = f.baseline
            base = f"{f.baseline_name}: {fmt(b.median)} {f.unit} [{fmt(b.min)}, {fmt(b.max)}]"
            ratio = f"{f.ratio:.2f}x"
        else:
            base, ratio = "", ""
        goal = f.goal + ("" if f.met is None else (" (met)" if f.met else " (missed)"))
        lines.append(f"| {f.name} | {value} | {base} | {ratio} | {goal} |")
    notes = [f"- {f.name}: {f.notes}" for f in figures if f.notes]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = ap.parse_args(argv)
    figures = []
    for name in args.only or BENCHMARKS:
        module, quick = BENCHMARKS[name]
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        mod = importlib.import_module(module)
        figures += mod.run(**(quick if args.quick else {}))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    host = machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {"when": when, "machine": host, "figures": [f.to_json() for f in figures]}, indent=2
        )
    )
    md = markdown(figures, when, host)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
