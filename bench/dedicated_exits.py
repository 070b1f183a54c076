"""Exits after start-up: a CPL3 compute partition on a dedicated core against a
partition doing port I/O, both in one supervisor (OSV's claim: nothing is
intercepted after boot).

The compute partition runs the bundled ``counter`` guest (a CPL3 counting
loop that prints nothing after its start) on dedicated host CPU 1, with HLT
and PAUSE exits disabled; the I/O partition runs ``ioloop`` (an ``outb`` to
port 0x80 per iteration, at CPL3) on the pool. After both have started, the
exit counters are read, then again ``window`` seconds later: the figure is
the exits per second that reached the VMM (``Partition.exit_stats()``'s
``vmm`` side) in that window, per partition. KVM's own count (all exits,
including those the kernel handles itself: host timer interrupts here) is
kept in ``extra``: on this nested host the host's timer tick still
interrupts the guest; on a host with ``nohz_full``/isolated cores it would
not either. Goal: 0 VMM exits/s for the compute partition.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time

from bench.common import Figure, Sample

PLAN = """
[vmm]
control_socket = "{dir}/s"

[[partition]]
name = "compute"
cpus = {cpus}
memory = "8M"
image = "guests:counter"
cmdline = "every=0x4000000000000000"

[[partition]]
name = "io"
cpus = "floating"
memory = "4M"
image = "guests:ioloop"
cmdline = "iters=0x7fffffffffffffff"
"""


def _totals(entry) -> tuple[int, int]:
    """(exits the VMM handled, exits KVM counted) over the partition's vCPUs."""
    vmm = kvm = 0
    for v in entry.partition.exit_stats():
        vmm += sum(v["vmm"].values())
        kvm += v["kvm"].get("exits", 0)
    return vmm, kvm


def run(repeats: int = 5, window: float = 1.0) -> list[Figure]:
    from osvmm.plan.config import parse_plan
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology
    from osvmm.up.supervisor import RUNNING, Supervisor

    cpus = '"1"' if (os.cpu_count() or 1) >= 2 else '"floating"'
    with tempfile.TemporaryDirectory() as tmp:
        plan = parse_plan(PLAN.format(dir=tmp, cpus=cpus), tmp)
        sup = Supervisor(place(plan, read_topology()))
        try:
            sup.start_all()
            compute, io = sup.partitions["compute"], sup.partitions["io"]
            deadline = time.monotonic() + 30
            while not (compute.state == RUNNING and io.state == RUNNING):
                if time.monotonic() > deadline:
                    raise RuntimeError("the partitions did not start")
                time.sleep(0.01)
            mem = compute.partition.memory
            while struct.unpack("<Q", mem.read(0x200000, 8))[0] == 0:  # in its CPL3 loop
                time.sleep(0.01)
            time.sleep(0.2)
            rates = {"compute": [], "io": [], "compute_kvm": [], "io_kvm": []}
            for _ in range(repeats):
                c0, i0 = _totals(compute), _totals(io)
                t0 = time.perf_counter()
                time.sleep(window)
                c1, i1 = _totals(compute), _totals(io)
                dt = time.perf_counter() - t0
                rates["compute"].append((c1[0] - c0[0]) / dt)
                rates["io"].append((i1[0] - i0[0]) / dt)
                rates["compute_kvm"].append((c1[1] - c0[1]) / dt)
                rates["io_kvm"].append((i1[1] - i0[1]) / dt)
            enforcement = list(compute.partition.enforcement)
        finally:
            sup.close()
    fig = Figure(
        "exits to the VMM after start-up: CPL3 compute partition on a dedicated core",
        "exits/s",
        Sample.of(rates["compute"]),
        baseline_name="port-I/O partition on the pool",
        baseline=Sample.of(rates["io"]),
        goal="0 exits/s",
        notes=(
            f"{repeats} windows of {window:g} s; KVM's own exit count (host timer "
            f"interrupts, handled in the kernel) for the compute partition: median "
            f"{Sample.of(rates['compute_kvm']).median:.0f}/s; compute on CPU "
            f"{cpus.strip(chr(34))}, {'; '.join(enforcement)}"
        ),
        extra={k: Sample.of(v).__dict__ for k, v in rates.items()},
    )
    fig.met = fig.value.max == 0
    return [fig]


if __name__ == "__main__":
    for f in run():
        print(f)
