"""Machine: construction helper and every validation error."""

from __future__ import annotations

import pytest

from osvmm.arch.x86 import layout
from osvmm.errors import ConfigError
from osvmm.machine import Machine, NumaNode

MiB = layout.MiB
GiB = layout.GiB


def test_default_plan_has_one_node_with_everything():
    plan = Machine(64 * MiB, [4, 5])
    assert plan.apic_ids == (4, 5)
    assert len(plan.numa_nodes) == 1
    node = plan.numa_nodes[0]
    assert node.node_id == 0 and node.apic_ids == (4, 5)
    assert node.mem_ranges == ((0, 64 * MiB),)
    assert plan.ioapic_id == 6
    assert plan.bsp_apic_id == 4


def test_simple_splits_memory_and_cpus_evenly():
    plan = Machine.build(256 * MiB, [0, 1], numa_nodes=2)
    assert [n.apic_ids for n in plan.numa_nodes] == [(0,), (1,)]
    assert [n.mem_ranges for n in plan.numa_nodes] == [
        ((0, 128 * MiB),),
        ((128 * MiB, 128 * MiB),),
    ]
    plan = Machine.build(100 * MiB, 5, numa_nodes=3)
    assert [n.apic_ids for n in plan.numa_nodes] == [(0, 1), (2, 3), (4,)]
    sizes = [sum(s for _, s in n.mem_ranges) for n in plan.numa_nodes]
    assert sizes == [32 * MiB, 32 * MiB, 36 * MiB]


def test_simple_splits_across_the_mmio_hole():
    plan = Machine.build(4 * GiB, [0, 1], numa_nodes=2, channels=True)
    assert plan.numa_nodes[0].mem_ranges == ((0, 2 * GiB),)
    assert plan.numa_nodes[1].mem_ranges == (
        (2 * GiB, layout.MMIO_HOLE_START - 2 * GiB),
        (layout.MMIO_HOLE_END, 4 * GiB - layout.MMIO_HOLE_START),
    )
    assert plan.reserved == ((layout.CHANNEL_WINDOW_START, layout.CHANNEL_WINDOW_SIZE),)


def test_distance_defaults_and_override():
    plan = Machine.build(64 * MiB, 2, numa_nodes=2)
    assert [plan.distance(i, j) for i in range(2) for j in range(2)] == [10, 20, 20, 10]
    nodes = plan.numa_nodes
    plan = Machine(64 * MiB, [0, 1], nodes, distances=[[10, 31], [32, 10]])
    assert plan.distance(0, 1) == 31 and plan.distance(1, 0) == 32


def two_nodes(mem_a, mem_b, cpus_a=(0,), cpus_b=(1,), ids=(0, 1)):
    return (NumaNode(ids[0], cpus_a, mem_a), NumaNode(ids[1], cpus_b, mem_b))


HALF = 32 * MiB


def m64(*args, **kwargs) -> Machine:
    """A Machine of 64 MiB."""
    return Machine(64 * MiB, *args, **kwargs)


GOOD_A = ((0, HALF),)
GOOD_B = ((HALF, HALF),)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Machine(1 * MiB, [0]), "below the minimum"),
        (lambda: Machine(64 * MiB + 512, [0]), "not a multiple of 4 KiB"),
        (lambda: m64([]), "at least one vCPU"),
        (lambda: m64([255]), "APIC ID 255 is outside 0..254"),
        (lambda: m64([-1]), "APIC ID -1 is outside"),
        (lambda: m64([3, 3]), "APIC ID 3 is given to two vCPUs"),
        (lambda: m64([0, 1], two_nodes(GOOD_A, GOOD_B, ids=(0, 2))), "node ids must be"),
        (lambda: m64([0, 1], two_nodes(GOOD_A, GOOD_B, cpus_b=(0, 1))), "in NUMA nodes 0"),
        (lambda: m64([0, 1], two_nodes(GOOD_A, GOOD_B, cpus_b=())), "in no NUMA node"),
        (lambda: m64([0], two_nodes(GOOD_A, GOOD_B)), "not vCPUs"),
        (lambda: m64([0, 1], two_nodes(GOOD_A, ())), "node 1 has no memory"),
        (
            lambda: m64([0, 1], two_nodes(GOOD_A, ((HALF, HALF - 4096),))),
            "do not cover the partition's RAM",
        ),
        (
            lambda: m64([0, 1], two_nodes(((0, HALF + 4096),), GOOD_B)),
            "do not cover the partition's RAM",
        ),
        (
            lambda: m64([0, 1], two_nodes(GOOD_A, ((HALF, HALF + 4096),))),
            "do not cover the partition's RAM",
        ),
        (lambda: m64([0, 1], two_nodes(GOOD_A, ((HALF, 100),))), "not page aligned"),
        (lambda: m64([0], reserved=[(32 * MiB, 4096)]), "overlaps RAM"),
        (lambda: m64([0], reserved=[(layout.IOAPIC_ADDR, 4096)]), "I/O APIC page"),
        (
            lambda: m64([0], reserved=[(layout.KVM_TSS_ADDR, 4096)]),
            "KVM's identity map and TSS",
        ),
        (
            lambda: m64([0], reserved=[(0xD000_0000, 8192), (0xD000_1000, 4096)]),
            "overlaps reserved range",
        ),
        (lambda: m64([0], reserved=[(0xD000_0000, 0)]), "empty"),
        (
            lambda: m64([0, 1], two_nodes(GOOD_A, GOOD_B), distances=[[10, 20]]),
            "must be 2x2",
        ),
        (
            lambda: m64([0, 1], two_nodes(GOOD_A, GOOD_B), distances=[[11, 20], [20, 10]]),
            "0->0 must be 10",
        ),
        (
            lambda: m64([0, 1], two_nodes(GOOD_A, GOOD_B), distances=[[10, 10], [20, 10]]),
            "0->1 must be in 11..255",
        ),
    ],
)
def test_validation_errors(make, message):
    """A Machine is validated when it is made: no invalid one exists to build from."""
    with pytest.raises(ConfigError, match=message):
        make()


def test_good_two_node_machine_is_made():
    m = Machine(64 * MiB, [0, 1], two_nodes(GOOD_A, GOOD_B))
    assert m.vcpus == 2 and m.ram_ranges == ((0, 64 * MiB),)


def test_simple_rejects_bad_splits():
    with pytest.raises(ConfigError, match="at least one NUMA node"):
        Machine.build(64 * MiB, 2, numa_nodes=0)
    with pytest.raises(ConfigError, match="cannot be split"):
        Machine.build(4 * MiB, 2, numa_nodes=4)
    with pytest.raises(ConfigError, match="given to two vCPUs"):
        Machine.build(64 * MiB, [1, 1])


def test_ram_ranges_are_derived_once_and_stored():
    m = Machine.build(3 * layout.GiB + 2 * MiB, 2)
    assert m.ram_ranges == ((0, layout.MMIO_HOLE_START), (layout.MMIO_HOLE_END, 2 * MiB))
    assert m.ram_ranges is m.ram_ranges  # a field, not recomputed on each read


@pytest.mark.parametrize("memory", [1 << 64, (8 << 40) + (1 << 30), 99999 << 40])
def test_memory_over_what_kvm_maps_is_a_config_error(memory):
    with pytest.raises(ConfigError, match="over the 8 TiB a partition may have"):
        Machine.build(memory, 1)


def test_numa_node_count_is_bounded_before_nodes_are_built():
    import time

    start = time.monotonic()
    with pytest.raises(ConfigError, match="100000 NUMA nodes: a partition has at most 64"):
        Machine.build(1 << 40, 1, 100_000)
    assert time.monotonic() - start < 1
    assert len(Machine.build(1 << 30, 4, 64).numa_nodes) == 64
