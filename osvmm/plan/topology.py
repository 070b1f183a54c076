"""The host's CPUs, cores, NUMA nodes and memory, read from sysfs.

``read_topology(sysfs_root, proc_root)`` reads only what placement needs:

    devices/system/cpu/online, present           which CPUs exist and run
    devices/system/cpu/cpuN/topology/            core_id, physical_package_id,
                                                 die_id, thread_siblings_list
    devices/system/node/nodeN/cpulist            the CPUs of each NUMA node
    devices/system/node/nodeN/meminfo            "Node N MemTotal: ... kB"
    devices/system/node/nodeN/hugepages/hugepages-2048kB/{nr,free}_hugepages
    kernel/mm/transparent_hugepage/enabled       "always [madvise] never"

Missing files are tolerated the way the kernel leaves them out: a kernel
without NUMA has no node directories (then one node 0 holds every CPU and
the MemTotal of /proc/meminfo), a CPU without a topology directory is its own
core in package 0, a missing hugepage directory means no hugepages, and a
missing THP file means THP is "never". A root with no CPUs at all is a
ConfigError (a wrong --host-sysfs).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from osvmm.errors import ConfigError
from osvmm.files import read_input
from osvmm.plan.config import format_cpu_list, parse_cpu_list

MAX_TOPOLOGY_FILE = 1 << 20  # bytes: a sysfs or procfs file of the topology

HUGEPAGE_2M_DIR = "hugepages-2048kB"


@dataclass(frozen=True)
class HostCpu:
    """One online logical CPU."""

    id: int
    core_id: int
    package_id: int
    die_id: int
    node: int
    siblings: tuple[int, ...]  # SMT threads of its core, itself included, sorted


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node: its online CPUs and its memory."""

    id: int
    cpus: tuple[int, ...]
    mem_total: int  # bytes
    hugepages_2m: int = 0  # reserved 2 MiB hugepages (nr_hugepages)
    hugepages_2m_free: int = 0


@dataclass(frozen=True)
class HostTopology:
    """What placement knows about the host."""

    cpus: dict[int, HostCpu]  # online CPUs by number
    nodes: dict[int, NumaNode]  # by node number
    present: tuple[int, ...]  # CPUs that exist, online or not
    thp: str = "never"  # transparent_hugepage/enabled: always, madvise or never
    source: str = "/sys"

    @property
    def online(self) -> tuple[int, ...]:
        return tuple(sorted(self.cpus))

    @property
    def mem_total(self) -> int:
        return sum(n.mem_total for n in self.nodes.values())

    def cores(self, node: int | None = None) -> list[tuple[int, ...]]:
        """The cores (each a sorted tuple of its online SMT threads), by first CPU.

        Only the cores of ``node`` when given.
        """
        seen: dict[tuple[int, ...], None] = {}
        for cpu in sorted(self.cpus.values(), key=lambda c: c.id):
            if node is None or cpu.node == node:
                seen.setdefault(cpu.siblings, None)
        return sorted(seen, key=lambda core: core[0])

    def describe(self) -> str:
        """One line: '32 CPUs (32 cores, 4 packages), 8 NUMA nodes, 63.8G, THP always'."""
        packages = {c.package_id for c in self.cpus.values()}
        gib = self.mem_total / (1 << 30)
        npkg, nnodes = len(packages), len(self.nodes)
        return (
            f"{len(self.cpus)} CPUs online ({format_cpu_list(self.online)}; "
            f"{len(self.cores())} cores, {npkg} package{'s' if npkg != 1 else ''}), "
            f"{nnodes} NUMA node{'s' if nnodes != 1 else ''}, "
            f"{gib:.1f}G memory, THP {self.thp}"
        )


def read_topology(sysfs_root: str = "/sys", proc_root: str | None = None) -> HostTopology:
    """Read the host topology under ``sysfs_root``.

    ``proc_root`` is where /proc/meminfo is read when sysfs has no NUMA node
    directories; by default /proc when ``sysfs_root`` is /sys, else
    ``<sysfs_root>/../proc`` (so a fixture tree can carry its own).
    """
    if proc_root is None:
        if os.path.normpath(sysfs_root) == "/sys":
            proc_root = "/proc"
        else:
            proc_root = os.path.join(os.path.dirname(os.path.normpath(sysfs_root)), "proc")
    cpu_dir = os.path.join(sysfs_root, "devices", "system", "cpu")
    node_dir = os.path.join(sysfs_root, "devices", "system", "node")

    numbered = _numbered_dirs(cpu_dir, "cpu")
    online_text = _read(os.path.join(cpu_dir, "online"))
    online = parse_cpu_list(online_text, "cpu/online") if online_text is not None else numbered
    present_text = _read(os.path.join(cpu_dir, "present"))
    present = parse_cpu_list(present_text, "cpu/present") if present_text is not None else []
    present = sorted(set(present) | set(numbered) | set(online))
    if not online:
        raise ConfigError(f"host topology: no CPUs under {cpu_dir}")

    # NUMA nodes: their CPUs and memory.
    node_cpus: dict[int, list[int]] = {}
    node_mem: dict[int, int] = {}
    node_huge: dict[int, tuple[int, int]] = {}
    for n in _numbered_dirs(node_dir, "node"):
        base = os.path.join(node_dir, f"node{n}")
        text = _read(os.path.join(base, "cpulist"))
        node_cpus[n] = [c for c in parse_cpu_list(text or "", "cpulist") if c in online]
        node_mem[n] = _meminfo_total(_read(os.path.join(base, "meminfo")) or "")
        huge = os.path.join(base, "hugepages", HUGEPAGE_2M_DIR)
        node_huge[n] = (
            _read_int(os.path.join(huge, "nr_hugepages"), 0),
            _read_int(os.path.join(huge, "free_hugepages"), 0),
        )
    if not node_cpus:
        meminfo = _read(os.path.join(proc_root, "meminfo"))
        if meminfo is None:
            raise ConfigError(
                f"host topology: no NUMA nodes under {node_dir} and no {proc_root}/meminfo"
            )
        node_cpus = {0: list(online)}
        node_mem = {0: _meminfo_total(meminfo)}
        node_huge = {0: (0, 0)}
    node_of: dict[int, int] = {}
    for n, cpus in node_cpus.items():
        for c in cpus:
            node_of.setdefault(c, n)
    first_node = min(node_cpus)
    for c in online:
        if c not in node_of:  # a CPU the node lists leave out: give it to the first node
            node_of[c] = first_node
            node_cpus[first_node].append(c)

    cpus: dict[int, HostCpu] = {}
    for c in online:
        topo = os.path.join(cpu_dir, f"cpu{c}", "topology")
        sib_text = _read(os.path.join(topo, "thread_siblings_list"))
        siblings = parse_cpu_list(sib_text, "thread_siblings_list") if sib_text else [c]
        siblings = [s for s in siblings if s in online] or [c]
        cpus[c] = HostCpu(
            id=c,
            core_id=_read_int(os.path.join(topo, "core_id"), c),
            package_id=_read_int(os.path.join(topo, "physical_package_id"), 0),
            die_id=_read_int(os.path.join(topo, "die_id"), 0),
            node=node_of[c],
            siblings=tuple(siblings),
        )

    nodes = {
        n: NumaNode(n, tuple(sorted(node_cpus[n])), node_mem[n], *node_huge[n])
        for n in sorted(node_cpus)
    }
    thp_text = _read(os.path.join(sysfs_root, "kernel", "mm", "transparent_hugepage", "enabled"))
    thp = "never"
    if thp_text:
        m = re.search(r"\[(\w+)\]", thp_text)
        thp = m.group(1) if m else thp_text.split()[0]
    return HostTopology(cpus, nodes, tuple(present), thp, sysfs_root)


def _read(path: str) -> str | None:
    """The text of a sysfs or procfs file, None when it does not exist; a file that is
    not a regular one (a FIFO in a fixture tree) or is over 1 MiB is a ConfigError."""
    if not os.path.exists(path) or not os.access(path, os.R_OK):
        return None  # as the kernel means a missing file (module docstring)
    data = read_input(path, f"host topology: {path}", MAX_TOPOLOGY_FILE, ConfigError)
    return data.decode("ascii", errors="replace").strip()


def _read_int(path: str, default: int) -> int:
    text = _read(path)
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _numbered_dirs(path: str, prefix: str) -> list[int]:
    try:
        names = os.listdir(path)
    except OSError:
        return []
    pat = re.compile(re.escape(prefix) + r"(\d{1,9})")  # cpu123456789 at most
    return sorted(int(m.group(1)) for name in names if (m := pat.fullmatch(name)))


def _meminfo_total(text: str) -> int:
    """Bytes of 'MemTotal:' in /proc/meminfo or 'Node N MemTotal:' in a node's meminfo."""
    m = re.search(r"MemTotal:\s*(\d{1,20})\s*kB", text)
    return int(m.group(1)) * 1024 if m else 0
