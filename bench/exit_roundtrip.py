"""Port-I/O exit round trip: a CPL3 `out` in the guest, KVM_RUN returns, KVM_RUN again.

The ioloop guest does ``iters`` outs to port 0x80 from CPL3. Each VMM runs it
with iters=N and iters=0, whole process each time, and the round trip is
(T_N - T_0) / N: start-up, guest set-up and the console cancel out.
Measured for osvmm, the C floor (bench/kvm_floor.c: the same guest straight
on /dev/kvm) and QEMU, in one run. Goal: osvmm within 1.1x of the floor.
"""

from __future__ import annotations

import shutil

from bench.common import Figure, Sample, osvmm_cmd, run_timed
from osvmm.guests.build import QEMU_MICROVM

QEMU = list(QEMU_MICROVM)


def _per_exit(cmd_for, n: int, repeats: int) -> Sample:
    values = []
    for _ in range(repeats):
        t_n = run_timed(cmd_for(n), expect_status=1).wall
        t_0 = run_timed(cmd_for(0), expect_status=1).wall
        values.append((t_n - t_0) / n * 1e6)
    return Sample.of(values)


def commands(image: str, floor: str) -> dict:
    return {
        "osvmm": lambda n: osvmm_cmd("run", image, "--append", f"iters={n}"),
        "floor": lambda n: [floor, image, f"iters={n}"],
        "qemu": lambda n: [*QEMU, "-kernel", image, "-append", f"iters={n}"],
    }


def run(n: int = 30000, repeats: int = 5) -> list[Figure]:
    from bench.floor import build_floor
    from osvmm.guests.build import guest_path

    image = str(guest_path("ioloop"))
    cmds = commands(image, str(build_floor()))
    results = {}
    order = ["floor", "osvmm"] + (["qemu"] if shutil.which("qemu-system-x86_64") else [])
    for name in order:
        results[name] = _per_exit(cmds[name], n, repeats)
    figs = [
        Figure(
            "port-I/O exit round trip: osvmm",
            "us",
            results["osvmm"],
            "C floor (kvm_floor)",
            results["floor"],
            goal="<= 1.1x the floor",
        )
    ]
    figs[0].met = figs[0].ratio <= 1.1
    if "qemu" in results:
        figs.append(
            Figure(
                "port-I/O exit round trip: QEMU",
                "us",
                results["qemu"],
                "C floor (kvm_floor)",
                results["floor"],
            )
        )
    return figs
