"""The control API's cost with 8 partitions: a request's round trip (``GET
/v1/vmm``, what ``osvmm ps`` asks) on a held connection and on a new
connection each, and a ``GET /metrics`` scrape; against a bare Unix-socket
round trip of the same bytes (a server that parses and builds nothing: the
transport's floor, measured in the same run).

The VMM is a real ``osvmm up --quiet`` of 8 floating partitions of 4 MiB,
measured twice: once with the hello guest (each has run and ended, and is kept
built: the VMM's own cost), once with the counter guest running in all eight
(a CPL3 loop each: on a host with fewer CPUs than partitions the control
threads wait for a CPU, and that is what a client then sees). Times are
wall-clock per request on the client (``time.perf_counter``), median of ``n``
requests per repeat; docs/performance.md has the method.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Figure, Sample

PARTITIONS = 8


def plan_text(sock: str, logs: str, guest: str = "counter") -> str:
    part = (
        '[[partition]]\nname = "p{i}"\ncpus = "floating"\nmemory = "4M"\n'
        f'image = "guests:{guest}"\ncmdline = "every=0x4000000"\n'
    )
    body = "".join(part.format(i=i) for i in range(PARTITIONS))
    return f'[vmm]\ncontrol_socket = "{sock}"\nlog_dir = "{logs}"\n' + body


def per_request_us(fn, n: int) -> float:
    """The median of ``n`` timed calls of ``fn``, in microseconds."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    times.sort()
    return times[len(times) // 2]


def floor_server(path: str, answer: bytes) -> socket.socket:
    """A Unix socket answering each request head with ``answer``: no parsing, no JSON."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)

    def serve(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\r\n\r\n" in buf:
                    _, _, buf = buf.partition(b"\r\n\r\n")
                    conn.sendall(answer)

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv


def measure(n: int, guest: str = "counter") -> dict[str, float]:
    from bench.common import env
    from osvmm.up import http
    from osvmm.up.protocol import call, connect, exchange, get_raw

    with tempfile.TemporaryDirectory(prefix="osvmm-bench-", dir="/tmp") as tmp:
        sock = f"{tmp}/ctl.sock"
        plan = Path(tmp) / "plan.toml"
        plan.write_text(plan_text(sock, f"{tmp}/logs", guest))
        settled = "running" if guest == "counter" else "stopped"
        proc = subprocess.Popen(
            [sys.executable, "-m", "osvmm.cli", "up", "--quiet", str(plan)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env(),
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"osvmm up did not start: {proc.stderr.read()[-300:]}")
                if os.path.exists(sock):
                    parts = call(sock, "GET", "/v1/partitions")["partitions"]
                    if all(p["state"] == settled for p in parts):
                        break
                time.sleep(0.05)
            held = connect(sock)
            buf = bytearray()
            scrapes = max(n // 4, 5)
            with held:
                held.sendall(http.request_bytes("GET", "/v1/vmm"))
                first = http.read_response(held, buf)
                answer = http.response(first.status, first.body)
                out = {
                    "held_us": per_request_us(
                        lambda: exchange(held, "GET", "/v1/vmm", None, buf), n
                    ),
                    "fresh_us": per_request_us(lambda: call(sock, "GET", "/v1/vmm"), n),
                    "metrics_us": per_request_us(lambda: get_raw(sock, "/metrics"), scrapes),
                    "metrics_bytes": len(get_raw(sock, "/metrics")),
                    "answer_bytes": len(answer),
                }
            floor_path = f"{tmp}/floor.sock"
            srv = floor_server(floor_path, answer)
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(floor_path)
                    fbuf = bytearray()
                    req = http.request_bytes("GET", "/v1/vmm")

                    def bare() -> None:
                        s.sendall(req)
                        http.read_response(s, fbuf)

                    out["floor_us"] = per_request_us(bare, n)
            finally:
                srv.close()
            return out
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)


def run(n: int = 300, repeats: int = 3) -> list[Figure]:
    idle = [measure(n, "hello") for _ in range(repeats)]
    busy = [measure(n, "counter") for _ in range(repeats)]

    def sample(runs: list[dict], key: str, scale: float = 1.0) -> Sample:
        return Sample.of([r[key] * scale for r in runs])

    held = Figure(
        f"GET /v1/vmm (osvmm ps's request) on a held connection, {PARTITIONS} partitions",
        "us",
        sample(idle, "held_us"),
        baseline_name="a bare Unix-socket round trip of the same bytes (no parsing, no JSON)",
        baseline=sample(idle, "floor_us"),
        goal="< 1 ms",
        notes=f"answer {idle[0]['answer_bytes']} bytes; median of {n} requests per run",
    )
    held.met = held.value.median < 1000
    fresh = Figure(
        f"GET /v1/vmm on a new connection each (connect, peer checks), {PARTITIONS} partitions",
        "us",
        sample(idle, "fresh_us"),
        baseline_name="the same on a held connection",
        baseline=sample(idle, "held_us"),
        goal="< 2 ms",
    )
    fresh.met = fresh.value.median < 2000
    scrape = Figure(
        f"GET /metrics scrape, {PARTITIONS} partitions",
        "ms",
        sample(idle, "metrics_us", 1e-3),
        baseline_name="GET /v1/vmm on a new connection",
        baseline=sample(idle, "fresh_us", 1e-3),
        goal="< 20 ms",
        notes=f"{idle[0]['metrics_bytes']} bytes of exposition text",
    )
    scrape.met = scrape.value.median < 20
    busy_held = Figure(
        f"GET /v1/vmm on a held connection, {PARTITIONS} partitions running CPL3 loops",
        "us",
        sample(busy, "held_us"),
        baseline_name="the same with the partitions ended (kept built)",
        baseline=sample(idle, "held_us"),
        notes="no goal: on a host with fewer CPUs than running vCPUs this is CPU scheduling",
    )
    busy_scrape = Figure(
        f"GET /metrics scrape, {PARTITIONS} partitions running (live KVM statistics read)",
        "ms",
        sample(busy, "metrics_us", 1e-3),
        baseline_name="the same with the partitions ended (kept built)",
        baseline=sample(idle, "metrics_us", 1e-3),
        goal="< 50 ms",
        notes=f"{busy[0]['metrics_bytes']} bytes of exposition text",
    )
    busy_scrape.met = busy_scrape.value.median < 50
    return [held, fresh, scrape, busy_held, busy_scrape]


if __name__ == "__main__":
    for f in run(n=100, repeats=1):
        print(f.name, f.value, f.baseline, f.met)
