"""Placement against the fixture hosts: CPU lists, counts, floating, memory, warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

from osvmm.errors import ConfigError
from osvmm.plan.config import load_plan, parse_plan
from osvmm.plan.placement import place
from osvmm.plan.topology import read_topology

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "sysfs"
OPTERON = read_topology(str(FIXTURES / "opteron-8node"))
EPYC = read_topology(str(FIXTURES / "epyc-2s128t"))
SMALL = read_topology(str(FIXTURES / "small-2cpu"))


def plan_of(*parts: str, channels: str = ""):
    text = "".join(f'[[partition]]\nname = "p{i}"\nimage = "g"\n{p}\n' for i, p in enumerate(parts))
    return parse_plan(text + channels, "/plans")


def test_cpu_lists_on_opteron():
    a = place(plan_of('cpus = "0-3"\nmemory = "2G"', 'cpus = [4, 5]\nmemory = "1G"'), OPTERON)
    p0, p1 = a.partitions
    assert p0.cpus == (0, 1, 2, 3) and p0.node == 0 and p0.vcpus == 4
    assert p0.apic_ids == (0, 1, 2, 3)
    assert p1.cpus == (4, 5) and p1.node == 1 and p1.apic_ids == (0, 1)
    assert a.owner(2) == "p0" and a.owner(6) is None
    assert a.pool == tuple(range(6, 32))
    assert a.memory_on(0) == [("p0", 2 << 30)]
    assert a.warnings == ()


def test_count_prefers_whole_free_node_on_opteron():
    # p0 holds CPU 1 on node 0, so 4 CPUs go to node 1, the first node with 4 free.
    a = place(plan_of('cpus = "1"\nmemory = "2M"', 'cpus = 4\nmemory = "4G"'), OPTERON)
    assert a.partition("p1").cpus == (4, 5, 6, 7) and a.partition("p1").node == 1
    # Three counts of 4: nodes 0, 1, 2 in order.
    a = place(plan_of(*['cpus = 4\nmemory = "1G"'] * 3), OPTERON)
    assert [p.cpus for p in a.partitions] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]


def test_count_largest_first_and_memory_decides_node():
    # p1 (count 4) is placed before p0 (count 2) although it comes later in the plan.
    a = place(plan_of('cpus = 2\nmemory = "1G"', 'cpus = 4\nmemory = "1G"'), OPTERON)
    assert a.partition("p1").cpus == (0, 1, 2, 3)
    assert a.partition("p0").cpus == (4, 5)
    # Node 0 reports 7936M: 8G of memory sends the count to node 1.
    a = place(plan_of('cpus = 2\nmemory = "8G"'), OPTERON)
    assert a.partition("p0").node == 1 and a.partition("p0").cpus == (4, 5)


def test_count_on_given_node():
    a = place(plan_of('cpus = 3\nnode = 5\nmemory = "1G"'), OPTERON)
    assert a.partition("p0").cpus == (20, 21, 22) and a.partition("p0").node == 5


def test_count_on_epyc_takes_whole_cores():
    a = place(plan_of('cpus = 4\nmemory = "8G"'), EPYC)
    assert a.partition("p0").cpus == (0, 1, 64, 65)
    assert a.partition("p0").node == 0
    # An odd count: two whole cores, then one thread of a free core (sibling stays free).
    a = place(plan_of('cpus = 5\nmemory = "8G"'), EPYC)
    assert a.partition("p0").cpus == (0, 1, 2, 64, 65)
    assert a.warnings == ()


def test_count_remainder_avoids_other_partitions_cores_on_epyc():
    # p0 owns CPU 0 (thread of core 0/64); p1's count of 2 takes core 1/65, not 64.
    a = place(plan_of('cpus = "0"\nmemory = "1G"', 'cpus = 2\nmemory = "1G"'), EPYC)
    assert a.partition("p1").cpus == (1, 65)
    # When only split cores are left on the node, the count uses them (and warns).
    node0 = [c for c in range(32)]  # one thread of every node-0 core
    text = f'cpus = {node0}\nmemory = "1G"'
    a = place(plan_of(text, 'cpus = 2\nnode = 0\nmemory = "1G"'), EPYC)
    assert a.partition("p1").cpus == (64, 65)
    assert any("SMT siblings" in w for w in a.warnings)


def test_count_too_big_for_any_node():
    with pytest.raises(ConfigError, match=r"partition 'p0': cpus: no NUMA node has 5 free"):
        place(plan_of('cpus = 5\nmemory = "1G"'), OPTERON)
    with pytest.raises(
        ConfigError,
        match=r"partition 'p1': cpus: 4 CPUs do not fit on node 0 \(3 CPUs free there\)",
    ):
        place(plan_of('cpus = "0"\nmemory = "2M"', 'cpus = 4\nnode = 0\nmemory = "1G"'), OPTERON)
    with pytest.raises(ConfigError, match=r"no NUMA node has 1 free CPUs and 9G of memory"):
        place(plan_of('cpus = 1\nmemory = "9G"'), OPTERON)


def test_pinned_errors():
    cases = [
        (
            ['cpus = "30-33"\nmemory = "2M"'],
            "partition 'p0': cpus: CPU 32 does not exist on this host (online: 0-31)",
        ),
        (
            ['cpus = "0-3"\nmemory = "2M"', 'cpus = "3"\nmemory = "2M"'],
            "partition 'p1': cpus: CPU 3 is already dedicated to 'p0'",
        ),
        (
            ['cpus = "2-5"\nmemory = "2M"'],
            "partition 'p0': cpus: CPUs 2-5 span NUMA nodes 0-1; set node = N for the memory",
        ),
        (
            ['cpus = "2"\nnode = 8\nmemory = "2M"'],
            "partition 'p0': node: NUMA node 8 does not exist on this host (nodes: 0-7)",
        ),
    ]
    for parts, message in cases:
        with pytest.raises(ConfigError) as exc:
            place(plan_of(*parts), OPTERON)
        assert str(exc.value) == message


def test_offline_cpu(tmp_path):
    import shutil

    root = tmp_path / "sys"
    shutil.copytree(FIXTURES / "small-2cpu", root)
    (root / "devices/system/cpu/online").write_text("0\n")
    with pytest.raises(ConfigError) as exc:
        place(plan_of('cpus = "1"\nmemory = "2M"'), read_topology(str(root)))
    assert str(exc.value) == "partition 'p0': cpus: CPU 1 is offline (online: 0)"


def test_memory_over_node_capacity():
    with pytest.raises(ConfigError) as exc:
        place(plan_of('cpus = "4"\nmemory = "5G"', 'cpus = "5"\nmemory = "4G"'), OPTERON)
    assert str(exc.value) == (
        "partition 'p1': memory: 4G does not fit on node 1 (8G total, 5G already given to 'p0')"
    )
    with pytest.raises(
        ConfigError, match=r"'p0': memory: 8G does not fit on node 0 \(7936M total\)"
    ):
        place(plan_of('cpus = "0"\nmemory = "8G"'), OPTERON)
    # A node given for the memory counts there, not where the CPUs are.
    with pytest.raises(ConfigError, match="does not fit on node 2"):
        place(plan_of('cpus = "8"\nmemory = "6G"', 'cpus = "0"\nnode = 2\nmemory = "3G"'), OPTERON)


def test_remote_node_warning():
    a = place(plan_of('cpus = "4-11"\nnode = 1\nmemory = "1G"'), OPTERON)
    assert a.partition("p0").node == 1
    assert a.warnings == (
        "partition 'p0': node: memory on node 1, CPUs on nodes 1-2 "
        "(memory is remote to some or all of its CPUs)",
    )


def test_smt_split_warning_on_epyc():
    a = place(plan_of('cpus = "0-3"\nmemory = "1G"', 'cpus = "64-65"\nmemory = "1G"'), EPYC)
    assert a.warnings == (
        "cpus: SMT siblings of one core belong to different partitions: 0 ('p0') and 64 ('p1') "
        "(they share the core's caches and execution units)",
        "cpus: SMT siblings of one core belong to different partitions: 1 ('p0') and 65 ('p1') "
        "(they share the core's caches and execution units)",
    )
    # Whole cores: no warning.
    a = place(plan_of('cpus = "0-1,64-65"\nmemory = "1G"', 'cpus = "2,66"\nmemory = "1G"'), EPYC)
    assert a.warnings == ()


def test_floating():
    a = place(plan_of('cpus = "floating"\nvcpus = 2\nmemory = "16M"'), SMALL)
    p = a.partition("p0")
    assert p.floating and p.cpus == () and p.vcpus == 2 and p.apic_ids == (0, 1)
    assert p.node == 0 and a.pool == (0, 1)
    # Pool on nodes 4-7 of the Opteron: memory on the pool node with the most left.
    pinned = 'cpus = "0-15"\nnode = 0\nmemory = "7G"'
    a = place(
        plan_of(pinned, 'cpus = "16"\nmemory = "7G"', 'cpus = "floating"\nmemory = "2G"'), OPTERON
    )
    assert a.partition("p2").node == 5
    a = place(plan_of(pinned, 'cpus = "floating"\nnode = 3\nmemory = "2G"'), OPTERON)
    assert a.partition("p1").node == 3


def test_floating_needs_a_free_cpu():
    with pytest.raises(ConfigError) as exc:
        place(plan_of('cpus = "0-1"\nmemory = "2M"', 'cpus = "floating"\nmemory = "2M"'), SMALL)
    assert str(exc.value) == (
        "partition 'p1': cpus: \"floating\" needs a CPU no partition owns, "
        "and all 2 online CPUs are dedicated"
    )


def test_all_dedicated_and_thp_warnings(tmp_path):
    import shutil

    a = place(plan_of('cpus = 2\nmemory = "16M"'), SMALL)
    assert a.warnings == (
        "cpus: every online CPU is dedicated to a partition; the VMM's own threads share them",
    )
    root = tmp_path / "sys"
    shutil.copytree(FIXTURES / "small-2cpu", root)
    (root / "kernel/mm/transparent_hugepage/enabled").write_text("always madvise [never]\n")
    a = place(
        plan_of('cpus = 1\nmemory = "16M"\nhugepages = true', 'cpus = 1\nmemory = "2M"'),
        read_topology(str(root)),
    )
    assert a.warnings[-1] == (
        "hugepages: THP is disabled on this host (transparent_hugepage: never); 'p0' use 4K pages"
    )


def test_thp_warning_names_auto_partitions_only_when_large(tmp_path):
    import shutil

    root = tmp_path / "sys"
    shutil.copytree(FIXTURES / "epyc-2s128t", root)
    (root / "kernel/mm/transparent_hugepage/enabled").write_text("always madvise [never]\n")
    a = place(
        plan_of(
            'cpus = "floating"\nmemory = "16M"',  # "auto": too small to want huge pages
            'cpus = "floating"\nmemory = "256M"',  # "auto": wants them
            'cpus = "floating"\nmemory = "256M"\nhugepages = false',
        ),
        read_topology(str(root)),
    )
    assert a.warnings[-1] == (
        "hugepages: THP is disabled on this host (transparent_hugepage: never); 'p1' use 4K pages"
    )


def test_examples_place_on_their_hosts():
    a = place(load_plan(HERE.parent / "examples" / "two-partitions.toml"), SMALL)
    assert [p.floating for p in a.partitions] == [True, True]
    a = place(load_plan(HERE.parent / "examples" / "opteron-8node.toml"), OPTERON)
    assert a.partition("db").cpus == (12, 13, 14, 15) and a.partition("db").node == 3
    assert a.partition("probe").node == 4
