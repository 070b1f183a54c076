"""``osvmm caps``: the host's KVM capabilities that osvmm uses, as a table."""

from __future__ import annotations

from osvmm.kvm import Kvm
from osvmm.kvm import ioctls as io

# capability -> (what osvmm uses it for, required?)
USES = {
    "KVM_CAP_IRQCHIP": ("in-kernel LAPIC, I/O APIC and PIC", True),
    "KVM_CAP_USER_MEMORY": ("guest memory slots", True),
    "KVM_CAP_SET_TSS_ADDR": ("the TSS pages KVM needs on Intel hosts", True),
    "KVM_CAP_EXT_CPUID": ("per-vCPU CPUID (APIC IDs, topology)", True),
    "KVM_CAP_MP_STATE": ("APs waiting for INIT/SIPI", True),
    "KVM_CAP_PIT2": ("in-kernel PIT", True),
    "KVM_CAP_SET_BOOT_CPU_ID": ("a BSP whose APIC ID is not 0", True),
    "KVM_CAP_SET_IDENTITY_MAP_ADDR": ("the identity-map page KVM needs on Intel hosts", False),
    "KVM_CAP_NR_VCPUS": ("recommended vCPUs per VM", False),
    "KVM_CAP_MAX_VCPUS": ("vCPUs per VM", False),
    "KVM_CAP_NR_MEMSLOTS": ("memory slots per VM", False),
    "KVM_CAP_READONLY_MEM": ("read-only channel mappings", False),
    "KVM_CAP_SYNC_REGS": ("hypercall registers without extra ioctls", False),
    "KVM_CAP_SIGNAL_MSI": ("doorbell interrupts", False),
    "KVM_CAP_IOEVENTFD": ("virtio queue notifications without an exit (--drive)", False),
    "KVM_CAP_IRQFD": ("virtio interrupts from the device thread (--drive)", False),
    "KVM_CAP_IMMEDIATE_EXIT": ("stopping a vCPU from another thread", False),
    "KVM_CAP_X86_DISABLE_EXITS": ("no HLT/PAUSE exits on dedicated cores", False),
    "KVM_CAP_BINARY_STATS_FD": ("exit statistics (--stats, osvmm stat)", False),
    "KVM_CAP_GET_TSC_KHZ": ("TSC frequency", False),
    "KVM_CAP_TSC_CONTROL": ("TSC scaling (migration between hosts)", False),
    "KVM_CAP_DIRTY_LOG_RING": ("dirty tracking for live migration", False),
    "KVM_CAP_NESTED_STATE": ("nested virtualization state", False),
    "KVM_CAP_XSAVE": ("snapshots: the XSAVE state (else the legacy FPU state)", False),
    "KVM_CAP_XSAVE2": ("snapshots: an XSAVE area over 4 KiB (AMX)", False),
    "KVM_CAP_XCRS": ("snapshots: XCR0", False),
    "KVM_CAP_VCPU_EVENTS": ("snapshots: pending exceptions, interrupts, NMIs", False),
    "KVM_CAP_DEBUGREGS": ("snapshots: debug registers", False),
    "KVM_CAP_ADJUST_CLOCK": ("snapshots: the KVM clock", False),
}


def read_caps(kvm: Kvm | None = None) -> list[tuple[str, int, str, bool]]:
    own = kvm is None
    kvm = kvm or Kvm()
    try:
        return [
            (name, kvm.check_extension(io.CAPS[name]), use, required)
            for name, (use, required) in USES.items()
        ]
    finally:
        if own:
            kvm.close()


def format_caps(rows=None) -> str:
    rows = read_caps() if rows is None else rows
    width = max(len(r[0]) for r in rows)
    lines = [f"{'capability':<{width}}  {'value':>8}  status    used for"]
    missing = []
    for name, value, use, required in rows:
        if value:
            status = "ok"
        elif required:
            status = "MISSING"
            missing.append(name)
        else:
            status = "absent"
        lines.append(f"{name:<{width}}  {value:>8}  {status:<8}  {use}")
    if missing:
        lines.append(f"osvmm cannot run here: missing {', '.join(missing)}")
    return "\n".join(lines) + "\n"
