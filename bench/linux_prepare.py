"""VMM-side time to prepare a 256 MiB Linux partition, up to the first KVM_RUN.

Measured in-process (interpreter start-up excluded): Partition.build() with
Debian's stock kernel (bzImage and vmlinux) and an initramfs: guest memory,
the VM, the kernel and initrd loaded, every table built, registers set.
The host probe (docs/host-accommodations.md) runs once per process and is
measured apart. Goal: under 50 ms here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import Figure, Sample
from osvmm.guests.build import cache_root

KERNEL_DIR = cache_root() / "kernel"  # where scripts/fetch-debian-kernel puts it


def _prepare_once(kernel: str, initrd: str) -> float:
    from osvmm.machine import Machine
    from osvmm.vmm.partition import Partition, PartitionConfig

    machine = Machine.build(256 << 20, 2)
    cfg = PartitionConfig(machine, kernel=kernel, initrd=initrd, cmdline="console=ttyS0")
    t0 = time.perf_counter()
    part = Partition(cfg).build()
    dt = time.perf_counter() - t0
    part.close()
    return dt * 1e3


def run(repeats: int = 7) -> list[Figure]:
    from osvmm.boot.initramfs import build_initramfs
    from osvmm.vmm.host_quirks import probe_host

    figs = []
    t0 = time.perf_counter()
    probe_host()
    probe_ms = (time.perf_counter() - t0) * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        initrd = str(build_initramfs(Path(tmp) / "initrd.cpio"))
        for label, path in (
            ("bzImage", KERNEL_DIR / "vmlinuz"),
            ("vmlinux", KERNEL_DIR / "vmlinux"),
        ):
            if not path.exists():
                continue
            _prepare_once(str(path), initrd)  # warm the page cache
            values = [_prepare_once(str(path), initrd) for _ in range(repeats)]
            fig = Figure(
                f"prepare a 256 MiB Linux partition ({label} + initramfs) to first KVM_RUN",
                "ms",
                Sample.of(values),
                goal="< 50 ms",
                notes=f"host probe, once per process, not included: {probe_ms:.1f} ms",
            )
            fig.met = fig.value.median < 50
            figs.append(fig)
    return figs
