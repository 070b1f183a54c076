"""Violation records and a partition's bounded log of them.

A ``Violation`` is one run of bytes a write tried to change in words its
writer may not write: the partition, vCPU, RIP and CPL of the writer, its
domain, the guest-physical address and size of the run, the old and the
attempted bytes, the decision (``logged``: applied and recorded, ``denied``:
dropped, ``fault``: dropped and the partition stopped) and the time.

``ViolationLog`` keeps the last ``keep`` records and counts every one by
decision; it outlives a partition's runs (the supervisor keeps one per
partition), so a violation that stopped a run can be read after the restart.
Appends come from vCPU threads, reads from the control socket: one lock.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass

DECISIONS = ("logged", "denied", "fault")
DEFAULT_KEEP = 4096


@dataclass(frozen=True)
class Violation:
    partition: str
    vcpu: int
    rip: int
    cpl: int
    domain: str  # "-" when the writer ran outside every domain
    gpa: int
    size: int
    old: bytes
    attempted: bytes
    decision: str
    time: float  # seconds since the epoch

    def to_json(self) -> dict:
        return {
            "partition": self.partition,
            "vcpu": self.vcpu,
            "rip": f"{self.rip:#x}",
            "cpl": self.cpl,
            "domain": self.domain,
            "gpa": f"{self.gpa:#x}",
            "size": self.size,
            "old": self.old.hex(),
            "attempted": self.attempted.hex(),
            "decision": self.decision,
            "time": round(self.time, 6),
        }

    def line(self) -> str:
        """One line of text: the console log's note and ``osvmm violations``."""
        return (
            f"write monitor: {self.decision}: vcpu {self.vcpu} rip {self.rip:#x} cpl {self.cpl} "
            f"domain {self.domain} wrote {self.size} bytes at {self.gpa:#x}: "
            f"{self.old.hex()} -> {self.attempted.hex()}"
        )


class ViolationLog:
    """The last ``keep`` violations, each with its sequence number (0, 1, ... since
    the log began: a reader pages through them with ``page(since, limit)``)."""

    def __init__(self, keep: int = DEFAULT_KEEP):
        self._records: deque[tuple[int, Violation]] = deque(maxlen=keep)
        self._counts: Counter[str] = Counter()
        self._next = 0
        self._lock = threading.Lock()

    def add(self, v: Violation) -> None:
        with self._lock:
            self._records.append((self._next, v))
            self._next += 1
            self._counts[v.decision] += 1

    def last(self, n: int | None = None) -> list[Violation]:
        """The last ``n`` records kept (all of them for None), oldest first."""
        with self._lock:
            records = [v for _, v in self._records]
        return records if n is None else records[-n:] if n > 0 else []

    def page(self, since: int | None, limit: int) -> list[tuple[int, Violation]]:
        """(seq, record) pairs: the last ``limit`` (``since`` None), or the first
        ``limit`` numbered ``since`` or later, oldest first."""
        with self._lock:
            records = list(self._records)
        if since is None:
            return records[-limit:] if limit > 0 else []
        return [r for r in records if r[0] >= since][:limit]

    def counts(self) -> dict[str, int]:
        """Violations by decision since the log began, and their total."""
        with self._lock:
            out = {d: self._counts[d] for d in DECISIONS}
        out["total"] = sum(out.values())
        return out
