"""``render_assignment``: the text ``osvmm plan`` prints (docs/config.md shows one).

Per NUMA node: its cores, one cell per core with the core's SMT threads joined
by '/' and the owning partition after ':' ('.' for a CPU no partition owns,
where floating partitions run; 'a,b' when the threads have different owners),
then the node's memory by partition and what is left. Then one line per
partition, the channels, the networks, the tap NICs and the warnings.
"""

from __future__ import annotations

import os

from osvmm.plan.config import format_cpu_list, format_size
from osvmm.plan.placement import Assignment, PartitionAssignment
from osvmm.plan.topology import HostTopology
from osvmm.vmm.tap import default_mac

WIDTH = 100
FREE = "."
MiB = 1 << 20
GiB = 1 << 30


def human_size(n: int) -> str:
    """Exact K/M/G when it is short (512M, 8G), else one decimal (7.8G, 4.8G)."""
    if n % MiB == 0 and (n < GiB or n % GiB == 0):
        return format_size(n)
    if n >= GiB:
        return f"{n / GiB:.1f}G"
    return f"{n / MiB:.1f}M"


def render_assignment(assignment: Assignment, topology: HostTopology) -> str:
    """The host's nodes with who owns what, then the partitions, channels and warnings."""
    lines = [
        f"host: {topology.describe()}",
        f"cores: SMT threads joined by '/', owners after ':', '{FREE}' = free (floating pool)",
    ]
    owner = {c: p.name for p in assignment.partitions for c in p.cpus}
    cells_by_node: dict[int, list[str]] = {}
    for n in topology.nodes:
        cells = []
        for core in topology.cores(n):
            owners = [owner.get(c, FREE) for c in core]
            who = owners[0] if len(set(owners)) == 1 else ",".join(owners)
            cells.append(f"{'/'.join(map(str, core))}:{who}")
        cells_by_node[n] = cells
    cell_width = max((len(c) for cells in cells_by_node.values() for c in cells), default=1)

    for n, node in topology.nodes.items():
        lines.append("")
        cpus = format_cpu_list(node.cpus) if node.cpus else "none"
        huge = ""
        if node.hugepages_2m:
            huge = f", 2M hugepages {node.hugepages_2m_free}/{node.hugepages_2m} free"
        lines.append(f"node {n}: CPUs {cpus}, memory {human_size(node.mem_total)}{huge}")
        lines.extend(_wrap(cells_by_node[n], cell_width, "  cpus    "))
        used = assignment.memory_on(n)
        free = node.mem_total - sum(m for _, m in used)
        parts = [f"{name} {format_size(m)}" for name, m in used]
        parts.append(f"free {human_size(free)}")
        lines.append("  memory  " + ", ".join(parts))

    lines.append("")
    rows = [("partition", "cpus", "vcpus", "node", "memory", "boot", "restart", "grants")]
    rows += [_row(p, assignment) for p in assignment.partitions]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())

    if assignment.plan.channels:
        lines.append("")
        for ch in assignment.plan.channels:
            members = ", ".join(f"{name} {mode}" for name, mode in ch.members)
            lines.append(f"channel {ch.name}: {format_size(ch.size)}, {members}")

    if assignment.plan.networks:
        lines.append("")
        for net in assignment.plan.networks:
            members = ", ".join(f"{name} {net.mac(name).hex(':')}" for name in net.members)
            lines.append(f"network {net.name}: {members}")

    taps = [(p.name, net) for p in assignment.partitions for net in p.spec.nets]
    if taps:
        lines.append("")
        for name, net in taps:
            lines.append(f"tap {net.tap}: {name} {(net.mac or default_mac(net.tap)).hex(':')}")

    if assignment.warnings:
        lines.append("")
        lines.extend(f"warning: {w}" for w in assignment.warnings)
    return "\n".join(lines) + "\n"


def _wrap(cells: list[str], width: int, prefix: str) -> list[str]:
    if not cells:
        return [prefix + "(no CPUs)"]
    per_line = max(1, (WIDTH - len(prefix)) // (width + 1))
    out = []
    for i in range(0, len(cells), per_line):
        chunk = cells[i : i + per_line]
        lead = prefix if i == 0 else " " * len(prefix)
        out.append((lead + " ".join(c.ljust(width) for c in chunk)).rstrip())
    return out


def _row(p: PartitionAssignment, assignment: Assignment) -> tuple[str, ...]:
    spec = p.spec
    base = assignment.plan.base_dir
    if p.floating:
        cpus = "floating"
    else:
        cpus = format_cpu_list(p.cpus) + (" (placed)" if spec.cpu_mode == "count" else "")
    if spec.image is not None:
        boot = "image " + (spec.image if spec.bundled_guest else _rel(spec.image, base))
    else:
        boot = "kernel " + _rel(spec.kernel or "", base)
        if spec.initrd:
            boot += " + initrd " + _rel(spec.initrd, base)
    if spec.restart == "restart":
        restart = f"restart ({spec.restart_limit}x, {spec.restart_backoff_ms}ms)"
    else:
        restart = "stop"
    grants = []
    if spec.privileged:
        grants.append("privileged")
    if spec.doorbells:
        grants.append("doorbells " + ",".join(spec.doorbells))
    chans = [f"{c.name} {c.mode(spec.name)}" for c in assignment.plan.channels_of(spec.name)]
    if chans:
        grants.append("channels " + ",".join(chans))
    return (
        spec.name,
        cpus,
        str(p.vcpus),
        str(p.node),
        format_size(spec.memory),
        boot,
        restart,
        "; ".join(grants) or "-",
    )


def _rel(path: str, base: str) -> str:
    """``path`` relative to the plan's directory when it lies under it."""
    rel = os.path.relpath(path, base)
    return path if rel.startswith("..") else rel
