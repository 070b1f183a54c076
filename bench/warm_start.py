"""Warm start: from a start request to a running VMM until the guest's first console byte.

In-process, as the supervisor starts a partition: in a process that already
imported osvmm and holds /dev/kvm open (one ``Kvm`` shared by every
partition), one run is ``Partition(config, kvm).build()`` then ``start()``,
timed with perf_counter until the console sink is handed the guest's first
byte (the hello guest's ``H``, written from CPL3 after the guest's own CPL0
set-up). One untimed run comes first (lazy imports, page cache). Split into
build (memory, VM, devices, image, vCPUs) and start-to-first-byte (threads
start, the guest's set-up, the first COM1 exit).

Through the supervisor (``osvmm up`` + ``osvmm start NAME``), when its control
socket exists, the same is measured from the start request on the socket to
the first console byte; see docs/performance.md for its state.

Baseline, same run: QEMU from exec to the first byte on its stdout (QEMU has
no warm start: a new partition is a new process). Goal: under 10 ms.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

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
    from osvmm.partition import Partition, PartitionConfig

    sink = FirstByte()
    t0 = time.perf_counter()
    part = Partition(PartitionConfig(image=image, console=sink), kvm).build()
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
    return [fig]


if __name__ == "__main__":
    for f in run(5):
        print(f.name, f.value, f.baseline, f.ratio, f.notes)
