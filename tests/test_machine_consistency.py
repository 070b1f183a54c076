"""One Machine per partition: the e820 map, the memslots and the hypercall monitor's
bounds all read the same RAM ranges, for the example plans and for random plans."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from osvmm.arch.x86 import layout
from osvmm.boot.e820 import E820_RAM, e820_map
from osvmm.hypercall.live import monitor_config
from osvmm.hypercall.monitor import build_topology
from osvmm.plan.config import load_plan, parse_plan
from osvmm.plan.placement import place
from osvmm.plan.topology import read_topology
from osvmm.up.partition_config import machine_of
from osvmm.vmm.memory import GuestMemory

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "sysfs"
EXAMPLES = {
    "opteron-8node.toml": FIXTURES / "opteron-8node",
    "two-partitions.toml": FIXTURES / "small-2cpu",
    "fault-containment.toml": FIXTURES / "small-2cpu",
}
# What firmware reserves inside the first RAM range (EBDA, VGA hole, BIOS area):
# backed by the memslot, but not RAM in e820.
BIOS_HOLE = (layout.EBDA_START, layout.HIGH_MEMORY_START)


def _merge(ranges):
    out = []
    for start, size in sorted(ranges):
        if out and start == out[-1][0] + out[-1][1]:
            out[-1][1] += size
        else:
            out.append([start, size])
    return [tuple(r) for r in out]


def _e820_ram_plus_bios_hole(machine):
    ram = [(e.addr, e.size) for e in e820_map(machine) if e.type == E820_RAM]
    return _merge([*ram, (BIOS_HOLE[0], BIOS_HOLE[1] - BIOS_HOLE[0])])


def assert_one_ram_layout(assignment):
    machines = {p.name: machine_of(assignment, p) for p in assignment.partitions}
    topology = build_topology(monitor_config(assignment.plan, machines))
    for part in topology.partitions:
        machine = machines[part.name]
        memory = GuestMemory(machine.ram_ranges)  # what Partition.build registers as memslots
        try:
            memslots = tuple((r.gpa, r.size) for r in memory.regions)
        finally:
            memory.close()
        assert part.ram == machine.ram_ranges == memslots
        assert _merge(part.ram) == _e820_ram_plus_bios_hole(machine)
        assert sum(size for _, size in part.ram) == part.memory == machine.memory
        assert part.vcpus == machine.vcpus == len(machine.apic_ids)


def test_example_plans_have_one_ram_layout():
    for name, sysfs in EXAMPLES.items():
        plan = load_plan(ROOT / "examples" / name)
        assert_one_ram_layout(place(plan, read_topology(str(sysfs))))


sizes_mib = st.sampled_from([2, 3, 4, 16, 64, 256, 3 * 1024 - 2, 3 * 1024, 3 * 1024 + 2, 5000])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(sizes_mib, st.integers(1, 4)), min_size=1, max_size=4),
    st.booleans(),
)
def test_random_plans_have_one_ram_layout(parts, with_channel):
    text = ""
    for i, (mib, vcpus) in enumerate(parts):
        text += (
            f'[[partition]]\nname = "p{i}"\ncpus = "floating"\nvcpus = {vcpus}\n'
            f'memory = "{mib}M"\nimage = "guests:hello"\n'
        )
    if with_channel:
        text += '[[channel]]\nname = "c"\nsize = "8K"\nmembers = { p0 = "rw" }\n'
    plan = parse_plan(text, ROOT)
    assignment = place(plan, read_topology(str(FIXTURES / "epyc-2s128t")))
    assert_one_ram_layout(assignment)
