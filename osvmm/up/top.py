"""``osvmm top``: a live view of a running VMM's partitions, in the manner of
virt-top and ``jailhouse cell stats`` (docs/operations.md).

One row per partition: its state, host CPUs (``~0-3`` for a floating one: the
pool it floats on), vCPUs, memory, exits per second (KVM's count of every exit,
then those that reached the VMM by kind: port I/O, MMIO, other), hypercalls per
second, restarts and boots, uptime. Each refresh reads ``GET /v1/vmm`` and
``GET /v1/stat`` (docs/api.md); the rates are the differences between two
refreshes. No curses: the screen is redrawn with two ANSI sequences (home,
clear), so it works on any terminal and under tmux, and a dumb pipe gets
plain frames. ``q`` (or Ctrl-C) quits; the terminal's settings are restored
however it ends.
"""

from __future__ import annotations

import os
import select
import sys
import time

from osvmm.errors import EXIT_INTERRUPTED, ControlError
from osvmm.up.protocol import call

HOME_CLEAR = "\x1b[H\x1b[2J"
COLUMNS = (
    ("NAME", "<", 12),
    ("STATE", "<", 8),
    ("CPUS", "<", 9),
    ("VCPU", ">", 4),
    ("MEM", ">", 6),
    ("EXITS/s", ">", 9),
    ("IO/s", ">", 8),
    ("MMIO/s", ">", 8),
    ("OTHER/s", ">", 8),
    ("HCALL/s", ">", 8),
    ("RESTARTS", ">", 8),
    ("BOOTS", ">", 5),
    ("UPTIME", ">", 9),
)
IO_KINDS = ("IoIn", "IoOut")
MMIO_KINDS = ("MmioRead", "MmioWrite")


def sample(path: str) -> tuple[dict, dict]:
    """(the VMM's answer to GET /v1/vmm, counters by partition name)."""
    vmm = call(path, "GET", "/v1/vmm", timeout=10)
    stat = call(path, "GET", "/v1/stat", timeout=10)
    counters = {}
    for p in stat["partitions"]:
        c = {"exits": 0, "io": 0, "mmio": 0, "other": 0, "hcalls": 0}
        for v in p["vcpus"]:
            c["exits"] += v["kvm"].get("exits", 0)
            for kind, n in v["vmm"].items():
                key = "io" if kind in IO_KINDS else "mmio" if kind in MMIO_KINDS else "other"
                c[key] += n
        for results in p.get("hypercalls", {}).values():
            c["hcalls"] += sum(results.values())
        counters[p["name"]] = c
    return vmm, counters


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _uptime(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _row(cells: list[str]) -> str:
    return " ".join(
        f"{c[:w]:{align}{w}}" for c, (_, align, w) in zip(cells, COLUMNS, strict=True)
    ).rstrip()


def frame(vmm: dict, now: dict, before: dict | None, seconds: float) -> str:
    """One screen: a title line, the header and one row per partition."""
    title = (
        f"osvmm top - pid {vmm['pid']}, {len(vmm['partitions'])} partitions, "
        f"plan {os.path.basename(vmm['plan'] or '-')}  (q quits)"
    )
    lines = [title, "", _row([c[0] for c in COLUMNS])]
    for p in vmm["partitions"]:
        c = now.get(p["name"], {})
        b = (before or {}).get(p["name"])

        def rate(key: str, c=c, b=b) -> str:
            if b is None or seconds <= 0 or key not in c:
                return "-"
            return f"{max(c[key] - b[key], 0) / seconds:.0f}"

        cpus = p["cpus"] if p["cpus"] != "floating" else f"~{p['pool']}"
        lines.append(
            _row(
                [
                    p["name"],
                    p["state"],
                    cpus,
                    str(p["vcpus"]),
                    _size(p["memory"]),
                    rate("exits"),
                    rate("io"),
                    rate("mmio"),
                    rate("other"),
                    rate("hcalls"),
                    str(p["restarts"]),
                    str(p["boots"]),
                    _uptime(p["uptime_s"]),
                ]
            )
        )
    return "\n".join(lines) + "\n"


def top(path: str, interval: float = 1.0, once: bool = False) -> int:
    if not interval > 0:
        raise ControlError("top: --interval is a positive number of seconds")
    if once:
        vmm, before = sample(path)
        t0 = time.monotonic()
        time.sleep(min(interval, 1.0))
        vmm, now = sample(path)
        sys.stdout.write(frame(vmm, now, before, time.monotonic() - t0))
        return 0
    stdin = sys.stdin.fileno()
    saved = None
    if os.isatty(stdin):
        import termios
        import tty

        saved = termios.tcgetattr(stdin)
        tty.setcbreak(stdin)
    out = sys.stdout
    before, t_before = None, 0.0
    try:
        while True:
            vmm, now = sample(path)
            t = time.monotonic()
            out.write(HOME_CLEAR + frame(vmm, now, before, t - t_before))
            out.flush()
            before, t_before = now, t
            if _quit_within(stdin, interval):
                return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _quit_within(stdin: int, seconds: float) -> bool:
    """Whether ``q`` is typed within ``seconds`` (a closed stdin, or one at its
    end, only waits: Ctrl-C still ends it)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            ready, _, _ = select.select([stdin], [], [], left)
            data = os.read(stdin, 64) if ready else None
        except (OSError, ValueError):
            data = b""
        if data is None:
            continue
        if not data:
            time.sleep(max(deadline - time.monotonic(), 0))
            return False
        if b"q" in data or b"Q" in data:
            return True
    return False
