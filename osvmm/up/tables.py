"""The text the client commands print: the ``ps`` table and the ``stat`` tables,
each from the VMM's JSON answer (docs/control-socket.md)."""

from __future__ import annotations

from osvmm.plan.config import format_size
from osvmm.vmm.exit_stats import format_exit_stats


def format_ps(partitions: list[dict], lost: dict | None = None) -> str:
    """One row per partition: state, CPUs, node, memory, boots, restarts, uptime, reason;
    then a line for each output that lost bytes (docs/control-socket.md)."""
    rows = [("NAME", "STATE", "CPUS", "NODE", "MEMORY", "BOOTS", "RESTARTS", "UPTIME", "REASON")]
    for p in partitions:
        up = f"{p['uptime_s']:.1f}s" if p["uptime_s"] is not None else "-"
        cpus = p["cpus"] if p["cpus"] != "floating" else f"floating({p['pool']})"
        rows.append(
            (
                p["name"],
                p["state"],
                f"{cpus} x{p['vcpus']}" if p["vcpus"] > 1 else cpus,
                str(p["node"]),
                format_size(p["memory"]),
                str(p["boots"]),
                str(p["restarts"]),
                up,
                p["reason"] or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    table = "".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] + "\n"
        for r in rows
    )
    return table + "".join(f"{line}\n" for line in _losses(partitions, lost or {}))


def _losses(partitions: list[dict], lost: dict) -> list[str]:
    """``counter: console bytes lost: stdout 120, log 4096 (No space left on device)``."""
    lines = []
    for p in partitions:
        c = p.get("console_lost") or {}
        parts = [f"{k} {c[k]}" for k in ("stdout", "log", "clients") if c.get(k)]
        if c.get("log_error"):
            parts.append(f"log error: {c['log_error']}")
        if parts:
            lines.append(f"{p['name']}: console bytes lost: " + ", ".join(parts))
    for name, what in lost.items():
        if what.get("missing") or what.get("error"):
            why = f" ({what['error']})" if what.get("error") else ""
            lines.append(f"osvmm: {name}: {what.get('missing', 0)} bytes lost{why}")
    return lines


def format_stat(partitions: list[dict]) -> str:
    """Per partition, live or of its last run: the exit statistics of osvmm/vmm/exit_stats.py."""
    return "".join(
        format_exit_stats(
            p["vcpus"],
            p.get("unclaimed_ports"),
            title=f"partition {p['name']} ({'now' if p['live'] else 'at the end of its last run'})",
        )
        for p in partitions
    )
