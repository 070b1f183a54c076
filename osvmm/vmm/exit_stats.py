"""The text of exit statistics, for ``osvmm run --stats`` and ``osvmm stat``.

Per vCPU: KVM's own exit counters (KVM_GET_STATS_FD: every exit, those the
kernel handled included), then the exits that reached the VMM, by kind; then
the port accesses (and MMIO pages) no device claimed. The input is
``Partition.exit_stats()`` and the ``unclaimed`` maps of its buses, as they
are or after a JSON round trip (the control socket's ``stat``: keys are
strings there).
"""

from __future__ import annotations


def format_exit_stats(
    per_vcpu: list[dict],
    unclaimed_ports: dict | None = None,
    unclaimed_mmio: dict | None = None,
    title: str = "exit statistics",
) -> str:
    """``title``, then a table per vCPU and the unclaimed accesses, indented under it."""
    lines = [title]
    if not per_vcpu:
        lines.append("  no run yet")
    for v in per_vcpu:
        kvm, vmm = v["kvm"], v["vmm"]
        width = max([len(k) for k in kvm] + [len(k) for k in vmm] + [4])
        lines.append(f"  vcpu {v['vcpu']}: KVM exits (all, in-kernel included)")
        lines += [f"    {name:<{width}}  {value:>12}" for name, value in kvm.items()]
        lines.append(f"  vcpu {v['vcpu']}: exits the VMM handled")
        lines += [f"    {name:<{width}}  {value:>12}" for name, value in vmm.items()]
        if not vmm:
            lines.append("    none")
    for what, counts in (
        ("port accesses no device claimed", unclaimed_ports),
        ("MMIO accesses no device claimed (by page)", unclaimed_mmio),
    ):
        if counts:
            by_address = sorted((int(k), n) for k, n in counts.items())
            lines.append(f"  {what}: " + ", ".join(f"{a:#x}x{n}" for a, n in by_address))
    return "\n".join(lines) + "\n"
