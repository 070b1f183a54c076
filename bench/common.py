"""What every benchmark shares: timing whole commands, summarizing repeats, figures.

A figure is a measured value with its baseline from the same run and the
ratio between them; each value is the median of repeated runs with min and max.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Sample:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Sample:
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass
class Figure:
    name: str
    unit: str
    value: Sample
    baseline_name: str | None = None
    baseline: Sample | None = None
    goal: str = ""
    met: bool | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline.median:
            return None
        return self.value.median / self.baseline.median

    def to_json(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def osvmm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "osvmm.cli", *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


@dataclass
class Timed:
    wall: float  # seconds
    returncode: int
    stdout: bytes


def run_timed(cmd: list[str], expect_status: int | None = None, timeout: float = 300) -> Timed:
    """Wall time of one whole process (peak RSS needs a fork+exec reporter: see
    bench/cold_start.py, since ru_maxrss carries the parent's peak across exec)."""
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, stdin=subprocess.DEVNULL, env=env(), timeout=timeout
    )
    wall = time.perf_counter() - start
    if expect_status is not None and proc.returncode != expect_status:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}, expected {expect_status}: "
            f"{proc.stderr.decode(errors='replace').strip()[-300:]}"
        )
    return Timed(wall, proc.returncode, proc.stdout)
