"""Formatting of exit statistics: KVM's own counts and the exits the VMM handled."""

from __future__ import annotations


def format_exit_stats(per_vcpu: list[dict], unclaimed_ports=None, unclaimed_mmio=None) -> str:
    """A table per vCPU: KVM's exit counters (KVM_GET_STATS_FD), then the VMM's count by kind."""
    lines = ["exit statistics"]
    for entry in per_vcpu:
        lines.append(f"  vcpu {entry['vcpu']}:")
        kvm = entry["kvm"]
        width = max((len(k) for k in kvm), default=0)
        lines.append("    KVM (all exits, including those handled in the kernel):")
        for name, value in kvm.items():
            lines.append(f"      {name:<{width}}  {value:>12}")
        lines.append("    VMM (exits that reached osvmm):")
        handled = entry["vmm"]
        if not handled:
            lines.append("      none")
        for name, value in handled.items():
            lines.append(f"      {name:<{width}}  {value:>12}")
    if unclaimed_ports:
        ports = ", ".join(f"{p:#x}x{n}" for p, n in sorted(unclaimed_ports.items()))
        lines.append(f"  port accesses no device claimed: {ports}")
    if unclaimed_mmio:
        pages = ", ".join(f"{p:#x}x{n}" for p, n in sorted(unclaimed_mmio.items()))
        lines.append(f"  MMIO accesses no device claimed (by page): {pages}")
    return "\n".join(lines) + "\n"
