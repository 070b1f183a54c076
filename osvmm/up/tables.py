"""The text the client commands print: the ``ps`` table, the ``stat`` tables, and
the write monitor's ``protect`` and ``violations``, each from the VMM's JSON
answer (docs/control-socket.md)."""

from __future__ import annotations

import time

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
    """Per partition, live or of its last run: the exit statistics of osvmm/vmm/exit_stats.py,
    the write monitor's counts where the partition has protection, and its hypercalls."""
    return "".join(
        format_exit_stats(
            p["vcpus"],
            p.get("unclaimed_ports"),
            title=f"partition {p['name']} ({'now' if p['live'] else 'at the end of its last run'})",
        )
        + format_write_monitor(p.get("write_monitor"))
        + format_hypercalls(p.get("hypercalls"))
        + format_devices(p.get("devices") or [])
        for p in partitions
    )


def format_hypercalls(calls: dict | None) -> str:
    """One line of the hypercalls a partition made, by call and result (``0``: success):
    ``hypercalls: DOORBELL 12 (-EPERM 2), PARTITION_INFO 1``; nothing without any."""
    if not calls:
        return ""
    parts = []
    for name, results in calls.items():
        ok = results.get("0", 0)
        failed = ", ".join(f"{r} {n}" for r, n in results.items() if r != "0")
        parts.append(f"{name} {ok}" + (f" ({failed})" if failed else ""))
    return "hypercalls: " + ", ".join(parts) + "\n"


def format_devices(devices: list[dict]) -> str:
    """A line per virtio device: its counters and its backend's, interrupts raised,
    and per queue ``avail/taken/used`` (the driver's available index, the entries
    the device took, the used index); a device that needs a reset says why."""
    out = []
    for slot, d in enumerate(devices):
        counts = ", ".join(f"{k} {v}" for k, v in {**d["counts"], **d["backend"]}.items())
        queues = " ".join(
            f"q{q['index']} {q['avail_idx'] if q['avail_idx'] is not None else '?'}"
            f"/{q['last_avail']}/{q['used_idx']}"
            for q in d["queues"]
        )
        line = f"device {slot} {d['name']}: {counts}; {d['interrupts']} interrupts"
        line += f"; queues {queues}" if queues else "; not set up by the driver"
        if d["rx_starved"]:
            line += "; waiting for receive buffers"
        if d["error"]:
            line += f"; needs a reset: {d['error']}"
        out.append(line + "\n")
    return "".join(out)


def format_write_monitor(wm: dict | None) -> str:
    """One line: armed or not, the policy, writes checked, violations by decision."""
    if not wm:
        return ""
    v = wm["violations"]
    counts = (
        f"{v['total']} violations ({v['logged']} logged, {v['denied']} denied, {v['fault']} fault)"
    )
    m = wm["monitor"]
    if m is None:
        return f"write monitor: not run yet; {counts}\n"
    state = f"armed, policy {m['policy']}, {m['pages']} pages" if m["armed"] else "disarmed"
    return f"write monitor: {state}; {m['trapped_writes']} writes checked this run; {counts}\n"


def format_protection(reply: dict) -> str:
    """What ``osvmm protect NAME`` prints: the state and the rules, ranges in hex."""
    name, rules, m = reply["name"], reply["rules"], reply["monitor"]
    if m is None:
        state = "not running"
    elif m["armed"]:
        state = (
            f"armed, policy {m['policy']}: {m['protected_bytes']} protected bytes on "
            f"{m['pages']} pages; permission table {m['table_segments']} segments, "
            f"{m['table_bytes']} bytes"
        )
    else:
        state = "disarmed"
    lines = [f"{name}: write monitor {state}"]
    if rules is None:
        lines.append("  no protection declared")
    else:
        lines.append(f"  policy {rules['policy']}, arm at {reply['arm']}")

        def spans(ss):
            return ", ".join(f"{s}..{e}" for s, e in ss) or "-"

        lines.append(f"  protected  {spans(rules['protected'])}")
        for dom, ss in rules["domains"].items():
            lines.append(f"  domain {dom}  code {spans(ss)}")
        for dom, ss in rules["grants"].items():
            lines.append(f"  grant {dom}  {spans(ss)}")
    return "\n".join(lines) + "\n"


def format_violations(reply: dict) -> str:
    """A table of the last violation records, then the counts."""
    rows = [
        (
            "SEQ",
            "TIME",
            "VCPU",
            "RIP",
            "CPL",
            "DOMAIN",
            "GPA",
            "SIZE",
            "OLD",
            "ATTEMPTED",
            "DECISION",
        )
    ]
    for v in reply["violations"]:
        stamp = (
            time.strftime("%H:%M:%S", time.localtime(v["time"]))
            + f".{int(v['time'] % 1 * 1000):03d}"
        )
        rows.append(
            (
                str(v["seq"]),
                stamp,
                str(v["vcpu"]),
                v["rip"],
                str(v["cpl"]),
                v["domain"],
                v["gpa"],
                str(v["size"]),
                v["old"],
                v["attempted"],
                v["decision"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows
    )
    c = reply["counts"]
    return text + (
        f"{reply['name']}: {c['total']} violations ({c['logged']} logged, {c['denied']} denied, "
        f"{c['fault']} fault); {len(reply['violations'])} shown\n"
    )
