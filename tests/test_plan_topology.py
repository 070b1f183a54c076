"""Host topology from sysfs: the committed fixture trees and missing-file fallbacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from osvmm.errors import ConfigError
from osvmm.plan.topology import read_topology

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sysfs"
GiB = 1 << 30


def test_opteron_8node():
    t = read_topology(str(FIXTURES / "opteron-8node"))
    assert t.online == tuple(range(32))
    assert sorted(t.nodes) == list(range(8))
    for n in range(8):
        assert t.nodes[n].cpus == tuple(range(4 * n, 4 * n + 4))
        assert t.nodes[n].mem_total == (8 * GiB if n else 8 * GiB - (256 << 20))
        assert t.nodes[n].hugepages_2m == 0
    assert t.cpus[13].node == 3
    assert t.cpus[13].package_id == 1 and t.cpus[13].die_id == 1 and t.cpus[13].core_id == 5
    assert t.cpus[13].siblings == (13,)
    assert len(t.cores()) == 32 and t.cores(7) == [(28,), (29,), (30,), (31,)]
    assert t.thp == "always"
    assert "32 CPUs online (0-31; 32 cores, 4 packages), 8 NUMA nodes" in t.describe()


def test_epyc_2s128t():
    t = read_topology(str(FIXTURES / "epyc-2s128t"))
    assert len(t.cpus) == 128 and sorted(t.nodes) == [0, 1]
    assert t.nodes[0].cpus == tuple(range(32)) + tuple(range(64, 96))
    assert t.nodes[1].cpus == tuple(range(32, 64)) + tuple(range(96, 128))
    assert t.cpus[5].siblings == (5, 69) and t.cpus[69].siblings == (5, 69)
    assert t.cpus[100].node == 1 and t.cpus[100].package_id == 1
    assert len(t.cores()) == 64 and t.cores(1)[0] == (32, 96)
    assert t.nodes[0].mem_total == 256 * GiB
    assert (t.nodes[0].hugepages_2m, t.nodes[0].hugepages_2m_free) == (1024, 1000)
    assert (t.nodes[1].hugepages_2m, t.nodes[1].hugepages_2m_free) == (1024, 1024)
    assert t.thp == "madvise"


def test_small_2cpu():
    t = read_topology(str(FIXTURES / "small-2cpu"))
    assert t.online == (0, 1) and list(t.nodes) == [0]
    assert t.nodes[0].mem_total == 5073100 * 1024
    assert t.cores() == [(0,), (1,)]


def test_offline_cpu_and_present(tmp_path):
    root = tmp_path / "sys"
    shutil.copytree(FIXTURES / "opteron-8node", root)
    (root / "devices/system/cpu/online").write_text("0-4,6-31\n")
    t = read_topology(str(root))
    assert 5 not in t.cpus and 5 in t.present
    assert t.nodes[1].cpus == (4, 6, 7)


def test_no_numa_uses_proc_meminfo(tmp_path):
    """A kernel without NUMA: no node directories, no topology files, no THP."""
    sysfs = tmp_path / "sys"
    cpu = sysfs / "devices/system/cpu"
    for i in range(3):
        (cpu / f"cpu{i}").mkdir(parents=True)
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal:        2048000 kB\nMemFree:  10 kB\n")
    t = read_topology(str(sysfs))  # proc defaults to <sysfs>/../proc
    assert t.online == (0, 1, 2)
    assert list(t.nodes) == [0] and t.nodes[0].cpus == (0, 1, 2)
    assert t.nodes[0].mem_total == 2048000 * 1024
    assert t.cpus[2].siblings == (2,) and t.cpus[2].core_id == 2 and t.cpus[2].package_id == 0
    assert t.thp == "never"
    assert read_topology(str(sysfs), str(proc)).nodes[0].mem_total == 2048000 * 1024


def test_missing_everything(tmp_path):
    with pytest.raises(ConfigError, match="host topology: no CPUs under"):
        read_topology(str(tmp_path))
    (tmp_path / "sys/devices/system/cpu/cpu0").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no NUMA nodes under .* and no .*/meminfo"):
        read_topology(str(tmp_path / "sys"), str(tmp_path / "noproc"))


def test_this_host_reads():
    """The real /sys of whatever machine runs the tests gives a usable topology."""
    t = read_topology()
    assert t.cpus and t.nodes and t.mem_total > 0
    assert set(t.online) == {c for n in t.nodes.values() for c in n.cpus}


def test_fixtures_match_generator(tmp_path, monkeypatch):
    """The committed trees are what tests/fixtures/make_sysfs.py writes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sysfs", FIXTURES.parent / "make_sysfs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "HERE", str(tmp_path))
    mod.opteron_8node()
    mod.epyc_2s128t()
    mod.small_2cpu()
    for tree in ("opteron-8node", "epyc-2s128t", "small-2cpu"):
        made = sorted(p.relative_to(tmp_path / tree) for p in (tmp_path / tree).rglob("*"))
        have = sorted(p.relative_to(FIXTURES / tree) for p in (FIXTURES / tree).rglob("*"))
        assert made == have, tree
        for rel in made:
            if (tmp_path / tree / rel).is_file():
                assert (tmp_path / tree / rel).read_text() == (FIXTURES / tree / rel).read_text()
