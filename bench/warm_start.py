"""Warm start: from a start request to a running VMM until the guest's first console byte.

In-process, as the supervisor starts a partition: in a process that already
imported osvmm and holds /dev/kvm open (one ``Kvm`` shared by every
partition), one run is ``Partition(config, kvm).build()`` then ``start()``,
timed with perf_counter until the console sink is handed the guest's first
byte (the hello guest's ``H``, written from CPL3 after the guest's own CPL0
set-up). One untimed run comes first (lazy imports, page cache). Split into
build (memory, VM, devices, image, vCPUs) and start-to-first-byte (threads
start, the guest's set-up, the first COM1 exit).

Through the supervisor: a running ``osvmm up`` with one stopped hello
partition; a client in this (warm) process sends ``start`` on the control
socket (what ``osvmm start NAME`` sends) and times until the first guest byte
arrives on a console connection attached beforehand.

Baseline, same run: QEMU from exec to the first byte on its stdout (QEMU has
no warm start: a new partition is a new process). Goal: under 10 ms.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.cold_start import QEMU
from bench.common import Figure, Sample


class FirstByte:
    """A console sink that notes when the first byte arrives."""

    def __init__(self):
        self.at: float | None = None
        self.event = threading.Event()

    def __call__(self, data: bytes) -> None:
        if self.at is None and data:
            self.at = time.perf_counter()
            self.event.set()


def warm_once(image: str, kvm) -> tuple[float, float]:
    """One in-process start; (build ms, start-to-first-byte ms)."""
    from osvmm.machine import Machine
    from osvmm.vmm.partition import Partition, PartitionConfig

    machine = Machine.build(64 << 20, 1)
    sink = FirstByte()
    t0 = time.perf_counter()
    part = Partition(PartitionConfig(machine, image=image, console=sink), kvm).build()
    t1 = time.perf_counter()
    part.start()
    try:
        if not sink.event.wait(10):
            raise RuntimeError("the hello guest printed nothing within 10 s")
    finally:
        part.wait(10)
        part.close()
    return (t1 - t0) * 1e3, (sink.at - t1) * 1e3


def qemu_first_byte(image: str) -> float:
    """ms from exec of QEMU to its first stdout byte (the guest's first console byte)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*QEMU, "-kernel", image],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    first = os.read(proc.stdout.fileno(), 1)
    t = time.perf_counter()
    proc.stdout.read()
    proc.wait()
    if not first:
        raise RuntimeError("QEMU printed nothing for the hello guest")
    return (t - t0) * 1e3


def _wait_state(sock: str, name: str, state: str, timeout: float = 20) -> None:
    from osvmm.up.protocol import request

    deadline = time.monotonic() + timeout
    while True:
        parts = {p["name"]: p for p in request(sock, {"cmd": "ps"})["partitions"]}
        if parts[name]["state"] == state:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"partition {name} not {state}: {parts[name]}")
        time.sleep(0.02)


def supervisor_runs(image: str, repeats: int) -> list[float]:
    """ms from a ``start`` request on a running ``osvmm up``'s control socket to the
    hello guest's first byte on an attached console connection."""
    from bench.cold_start import child_env
    from osvmm.up.protocol import connect, read_line, request, send

    with tempfile.TemporaryDirectory(prefix="osvmm-bench-", dir="/tmp") as tmp:
        sock = f"{tmp}/ctl.sock"
        plan = Path(tmp) / "plan.toml"
        plan.write_text(
            f'[vmm]\ncontrol_socket = "{sock}"\nlog_dir = "{tmp}/logs"\n\n[[partition]]\n'
            f'name = "hello"\ncpus = "floating"\nmemory = "64M"\nimage = "{image}"\n'
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "osvmm.cli", "up", "--quiet", str(plan)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        console = None
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"osvmm up did not start: {proc.stderr.read()[-300:]}")
                time.sleep(0.02)
            _wait_state(sock, "hello", "stopped")  # its first boot at `up` has ended
            console = connect(sock)
            buf = bytearray()
            send(console, {"cmd": "console", "name": "hello"})
            read_line(console, buf)
            seen = FirstByte()
            armed = threading.Event()

            def reader():
                while True:
                    try:
                        data = console.recv(4096)
                    except OSError:
                        return
                    if not data:
                        return
                    if armed.is_set() and b"H" in data:  # "Hello from osvmm guest"
                        seen(data)

            threading.Thread(target=reader, daemon=True).start()
            out = []
            for i in range(repeats + 1):  # the first is a warm-up
                time.sleep(0.05)  # the last run's "[osvmm: ended ...]" note is through
                seen.__init__()
                armed.set()
                t0 = time.perf_counter()
                request(sock, {"cmd": "start", "name": "hello"})
                if not seen.event.wait(10):
                    raise RuntimeError("no console byte after osvmm start")
                armed.clear()
                if i:
                    out.append((seen.at - t0) * 1e3)
                _wait_state(sock, "hello", "stopped")
            return out
        finally:
            if console is not None:
                console.close()
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)


def run(repeats: int = 20) -> list[Figure]:
    from osvmm.guests.build import guest_path
    from osvmm.kvm import Kvm

    image = str(guest_path("hello"))
    kvm = Kvm()
    try:
        warm_once(image, kvm)
        runs = [warm_once(image, kvm) for _ in range(repeats)]
    finally:
        kvm.close()
    total = Sample.of([b + s for b, s in runs])
    build = Sample.of([b for b, _ in runs])
    first = Sample.of([s for _, s in runs])
    qemu = None
    if shutil.which(QEMU[0]):
        qemu_first_byte(image)
        qemu = Sample.of([qemu_first_byte(image) for _ in range(max(3, repeats // 2))])
    fig = Figure(
        "warm start: start request to first console byte (in-process, shared /dev/kvm)",
        "ms",
        total,
        "QEMU exec to first byte" if qemu else None,
        qemu,
        goal="< 10 ms",
        notes=(
            f"build {build.median:.1f} ms [{build.min:.1f}, {build.max:.1f}], then start to "
            f"first byte {first.median:.1f} ms [{first.min:.1f}, {first.max:.1f}]"
        ),
    )
    fig.met = total.median < 10
    fig.extra = {"build_ms": build.__dict__, "start_to_first_byte_ms": first.__dict__}
    sup = Sample.of(supervisor_runs(image, max(3, repeats // 2)))
    via = Figure(
        "warm start: `start` request on `osvmm up`'s control socket to first console byte",
        "ms",
        sup,
        fig.baseline_name,
        qemu,
        goal="< 10 ms",
        notes="request sent by a client in a warm process (not the `osvmm start` command, "
        "which adds an interpreter start-up); the byte read on an attached console connection",
    )
    via.met = sup.median < 10
    return [fig, via]


if __name__ == "__main__":
    for f in run(5):
        print(f.name, f.value, f.baseline, f.ratio, f.notes)
