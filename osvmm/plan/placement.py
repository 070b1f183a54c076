"""Placement: check a plan against the host and give each partition CPUs and a node.

``place(plan, topology) -> Assignment`` runs before anything starts and raises
ConfigError for a plan the host cannot hold. In order:

1. Partitions with a CPU list (``cpus = "2-3"``): each CPU must exist and be
   online, no CPU may belong to two partitions, and the CPUs must lie on one
   NUMA node unless ``node`` says where the memory goes.
2. Partitions with a count (``cpus = 4``), largest count first, then plan
   order: on the free CPUs of one node (``node`` when given; otherwise the
   lowest-numbered node that can hold the CPUs and the memory, preferring one
   where whole free cores suffice). Within the node whole free cores are taken
   first; a remainder comes from cores with a free sibling left over, and only
   then from cores whose other thread already belongs to a partition.
3. Floating partitions (``cpus = "floating"``) run on the pool of CPUs no
   partition owns; the pool must not be empty. Their memory goes to ``node``,
   or else the node of the pool's CPUs with the most memory left.
4. Memory: the partitions' memory per node must fit the node's MemTotal.

Guest APIC IDs are consecutive from 0 (vCPU i has APIC ID i, vCPU 0 is the
bootstrap processor), whatever the host CPUs' own APIC IDs: a guest sees a
compact topology that does not change when its host CPUs do, and the 8-bit
xAPIC/MP-table ID space suffices for any partition of up to 255 vCPUs.
With dedicated CPUs, vCPU i runs on the i-th host CPU of ``cpus`` (sorted).

Warnings (returned in ``Assignment.warnings``, never raised): two partitions
on the two SMT threads of one core, memory on a node away from the CPUs,
``hugepages = true`` where THP is "never", and no CPU left for the VMM itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from osvmm.arch.x86.layout import HUGEPAGE_MIN_RANGE
from osvmm.errors import ConfigError
from osvmm.plan.config import PartitionSpec, Plan, format_cpu_list, format_size
from osvmm.plan.topology import HostTopology


@dataclass(frozen=True)
class PartitionAssignment:
    """Where one partition runs."""

    spec: PartitionSpec
    cpus: tuple[int, ...]  # dedicated host CPUs, vCPU i on cpus[i]; () when floating
    node: int  # NUMA node of its memory
    apic_ids: tuple[int, ...]  # guest APIC ID of each vCPU: 0 .. vcpus-1

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def floating(self) -> bool:
        return self.spec.floating

    @property
    def vcpus(self) -> int:
        return len(self.apic_ids)

    @property
    def memory(self) -> int:
        return self.spec.memory


@dataclass(frozen=True)
class Assignment:
    """The whole placement: partitions in plan order, the shared pool, warnings."""

    plan: Plan
    partitions: tuple[PartitionAssignment, ...]
    pool: tuple[int, ...]  # online CPUs no partition owns (where floating vCPUs run)
    warnings: tuple[str, ...] = ()

    def partition(self, name: str) -> PartitionAssignment:
        for p in self.partitions:
            if p.name == name:
                return p
        raise KeyError(name)

    def owner(self, cpu: int) -> str | None:
        """The partition that owns host CPU ``cpu``, or None for a pool CPU."""
        for p in self.partitions:
            if cpu in p.cpus:
                return p.name
        return None

    def memory_on(self, node: int) -> list[tuple[str, int]]:
        """(partition, bytes) of the memory placed on ``node``, in plan order."""
        return [(p.name, p.memory) for p in self.partitions if p.node == node]


def place(plan: Plan, topology: HostTopology) -> Assignment:
    """Check ``plan`` against ``topology`` and place every partition."""
    owner: dict[int, str] = {}
    cpus_of: dict[str, tuple[int, ...]] = {}
    node_of: dict[str, int] = {}
    warnings: list[str] = []
    used_mem: dict[int, int] = {n: 0 for n in topology.nodes}

    def check_node(spec: PartitionSpec) -> None:
        if spec.node is not None and spec.node not in topology.nodes:
            raise ConfigError(
                f"partition {spec.name!r}: node: NUMA node {spec.node} does not exist on "
                f"this host (nodes: {format_cpu_list(topology.nodes)})"
            )

    def take_memory(spec: PartitionSpec, node: int) -> None:
        total = topology.nodes[node].mem_total
        before = used_mem[node]
        if before + spec.memory > total:
            detail = f"{_gib(total)} total"
            others = [repr(n) for n, nd in node_of.items() if nd == node]
            if others:
                detail += f", {format_size(before)} already given to {', '.join(others)}"
            raise ConfigError(
                f"partition {spec.name!r}: memory: {format_size(spec.memory)} does not fit "
                f"on node {node} ({detail})"
            )
        used_mem[node] = before + spec.memory
        node_of[spec.name] = node

    # 1. CPU lists.
    for spec in plan.partitions:
        check_node(spec)
        if spec.cpu_mode != "pinned":
            continue
        where = f"partition {spec.name!r}: cpus"
        online = format_cpu_list(topology.online)
        for cpu in spec.cpus or ():
            if cpu not in topology.present:
                raise ConfigError(
                    f"{where}: CPU {cpu} does not exist on this host (online: {online})"
                )
            if cpu not in topology.cpus:
                raise ConfigError(f"{where}: CPU {cpu} is offline (online: {online})")
            if cpu in owner:
                raise ConfigError(f"{where}: CPU {cpu} is already dedicated to {owner[cpu]!r}")
        for cpu in spec.cpus or ():
            owner[cpu] = spec.name
        cpus_of[spec.name] = tuple(spec.cpus or ())
        nodes = sorted({topology.cpus[c].node for c in cpus_of[spec.name]})
        if spec.node is None and len(nodes) > 1:
            raise ConfigError(
                f"{where}: CPUs {format_cpu_list(cpus_of[spec.name])} span NUMA nodes "
                f"{format_cpu_list(nodes)}; set node = N for the memory"
            )
        node = nodes[0] if spec.node is None else spec.node
        if spec.node is not None and nodes != [spec.node]:
            on = f"node {nodes[0]}" if len(nodes) == 1 else f"nodes {format_cpu_list(nodes)}"
            warnings.append(
                f"partition {spec.name!r}: node: memory on node {spec.node}, CPUs on {on} "
                "(memory is remote to some or all of its CPUs)"
            )
        take_memory(spec, node)

    # 2. CPU counts, largest first.
    counted = [s for s in plan.partitions if s.cpu_mode == "count"]
    counted.sort(key=lambda s: -(s.cpu_count or 0))  # stable: plan order among equals
    for spec in counted:
        node, cpus = _place_count(spec, topology, owner, used_mem)
        for cpu in cpus:
            owner[cpu] = spec.name
        cpus_of[spec.name] = cpus
        take_memory(spec, node)

    # 3. Floating partitions on the pool.
    pool = tuple(c for c in topology.online if c not in owner)
    for spec in plan.partitions:
        if not spec.floating:
            continue
        if not pool:
            raise ConfigError(
                f'partition {spec.name!r}: cpus: "floating" needs a CPU no partition owns, '
                f"and all {len(topology.cpus)} online CPUs are dedicated"
            )
        pool_nodes = sorted({topology.cpus[c].node for c in pool})
        if spec.node is not None:
            node = spec.node
        elif len(pool_nodes) == 1:
            node = pool_nodes[0]
        else:  # the pool's node with the most memory left (the lowest on a tie)
            node = max(pool_nodes, key=lambda n: (topology.nodes[n].mem_total - used_mem[n], -n))
        cpus_of[spec.name] = ()
        take_memory(spec, node)

    # Warnings.
    for core in topology.cores():
        owners = sorted({owner[c] for c in core if c in owner})
        if len(owners) > 1:
            who = " and ".join(f"{c} ({owner[c]!r})" for c in core if c in owner)
            warnings.append(
                f"cpus: SMT siblings of one core belong to different partitions: {who} "
                "(they share the core's caches and execution units)"
            )
    if not pool:
        warnings.append(
            "cpus: every online CPU is dedicated to a partition; the VMM's own threads share them"
        )
    if topology.thp == "never":
        huge = [
            s.name
            for s in plan.partitions
            if s.hugepages or (s.hugepages is None and s.memory >= HUGEPAGE_MIN_RANGE)
        ]
        if huge:
            warnings.append(
                f"hugepages: THP is disabled on this host (transparent_hugepage: never); "
                f"{', '.join(repr(n) for n in huge)} use 4K pages"
            )

    result = tuple(
        PartitionAssignment(
            spec=spec,
            cpus=cpus_of[spec.name],
            node=node_of[spec.name],
            apic_ids=tuple(range(spec.vcpus)),
        )
        for spec in plan.partitions
    )
    return Assignment(plan, result, pool, tuple(warnings))


def _place_count(
    spec: PartitionSpec,
    topology: HostTopology,
    owner: dict[int, str],
    used_mem: dict[int, int],
) -> tuple[int, tuple[int, ...]]:
    """Choose ``spec.cpu_count`` free CPUs on one node: (node, cpus)."""
    want = spec.cpu_count or 0
    where = f"partition {spec.name!r}: cpus"
    candidates = [spec.node] if spec.node is not None else sorted(topology.nodes)
    fits: list[tuple[bool, int, list[tuple[int, ...]]]] = []
    most_free = (0, candidates[0])
    for n in candidates:
        free_cores = [
            tuple(c for c in core if c not in owner)
            for core in topology.cores(n)
            if any(c not in owner for c in core)
        ]
        nfree = sum(len(core) for core in free_cores)
        most_free = max(most_free, (nfree, -n))
        if nfree < want:
            continue
        if used_mem[n] + spec.memory > topology.nodes[n].mem_total and spec.node is None:
            continue
        full_cores = set(topology.cores(n))
        whole = sum(len(core) for core in free_cores if core in full_cores)
        fits.append((whole >= want, n, free_cores))
    if not fits:
        if spec.node is not None:
            free = most_free[0]
            raise ConfigError(
                f"{where}: {want} CPUs do not fit on node {spec.node} ({free} CPUs free there)"
            )
        free, node = most_free[0], -most_free[1]
        raise ConfigError(
            f"{where}: no NUMA node has {want} free CPUs and {format_size(spec.memory)} of "
            f"memory left (most free CPUs: {free} on node {node}); list the CPUs instead"
        )
    fits.sort(key=lambda f: (not f[0], f[1]))
    _, node, free_cores = fits[0]
    full_cores = set(topology.cores(node))
    whole = [core for core in free_cores if core in full_cores]
    partial = [core for core in free_cores if core not in full_cores]
    chosen: list[int] = []
    # Whole cores while the remainder still fills them; then the remainder from
    # whole cores (their other threads stay in the pool), then from shared cores.
    for core in whole:
        if want - len(chosen) >= len(core):
            chosen.extend(core)
    leftovers = [core for core in whole if core[0] not in chosen] + partial
    for core in leftovers:
        for cpu in core:
            if len(chosen) < want:
                chosen.append(cpu)
    return node, tuple(sorted(chosen))


def _gib(n: int) -> str:
    if n % (1 << 20) == 0:
        return format_size(n)
    return f"{n / (1 << 30):.1f}G"
