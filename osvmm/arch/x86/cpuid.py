"""Per-vCPU CPUID from KVM's supported set (pure over kvm_cpuid_entry2 values).

Each vCPU sees its own APIC ID (leaf 1 EBX[31:24], leaves 0xB/0x1F EDX) and
the partition's logical processor count; the hypervisor bit is set. Host
accommodations (``mask``) clear named feature bits, e.g. CX16 where this host's
emulator lacks cmpxchg16b (docs/host-accommodations.md).
"""

from __future__ import annotations

import ctypes

from osvmm.kvm.structs import kvm_cpuid_entry2

# (leaf, register, bit) of features osvmm may mask.
FEATURES = {
    "cx16": (1, "ecx", 13),
    "xsave": (1, "ecx", 26),
    "osxsave": (1, "ecx", 27),
    "x2apic": (1, "ecx", 21),
    "hypervisor": (1, "ecx", 31),
}


TSC_DEADLINE_BIT = 24  # CPUID.01H:ECX


def vcpu_cpuid(
    supported: list[kvm_cpuid_entry2],
    apic_id: int,
    nr_vcpus: int,
    mask: tuple[str, ...] = (),
    tsc_deadline: bool = False,
) -> list[kvm_cpuid_entry2]:
    """The CPUID of one vCPU from KVM's supported list: its APIC ID and the logical
    count in leaf 1 and the topology leaves, the hypervisor bit, ``mask``'s features
    cleared. ``tsc_deadline``: KVM emulates the LAPIC's TSC-deadline mode
    (KVM_CAP_TSC_DEADLINE_TIMER) but leaves announcing it, CPUID.01H:ECX[24], to
    the VMM; without it Linux has no TSC-deadline timer."""
    out = []
    for e in supported:
        e = kvm_cpuid_entry2.from_buffer_copy(e)
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | ((nr_vcpus & 0xFF) << 16) | ((apic_id & 0xFF) << 24)
            e.edx |= 1 << 28  # HTT: the logical count in EBX[23:16] is valid
            e.ecx |= 1 << 31  # running under a hypervisor
            if tsc_deadline:
                e.ecx |= 1 << TSC_DEADLINE_BIT
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id
        for name in mask:
            leaf, reg, bit = FEATURES[name]
            if e.function == leaf and e.index == 0:
                setattr(e, reg, getattr(e, reg) & ~(1 << bit))
        out.append(e)
    return out


assert ctypes.sizeof(kvm_cpuid_entry2) == 40


# (leaf, subleaf, register) whose bits are CPU features: a vCPU restored on another
# host needs each of its bits there too (vmm/snapshot.py).
FEATURE_REGISTERS = (
    (0x1, 0, "ecx"),
    (0x1, 0, "edx"),
    (0x7, 0, "ebx"),
    (0x7, 0, "ecx"),
    (0x7, 0, "edx"),
    (0x7, 1, "eax"),
    (0xD, 1, "eax"),
    (0x80000001, 0, "ecx"),
    (0x80000001, 0, "edx"),
)


def missing_features(wanted: list[kvm_cpuid_entry2], offered: list[kvm_cpuid_entry2]) -> list[str]:
    """The feature bits ``wanted`` (a vCPU's CPUID) sets that ``offered`` (what this
    host would give the same vCPU) lacks, as ``"leaf 0x7.0 ebx 0x..."``; empty when
    every one is there."""

    def reg(entries, leaf, sub, name) -> int:
        for e in entries:
            if e.function == leaf and (e.index == sub or not e.flags & 1):
                return getattr(e, name)
        return 0

    out = []
    for leaf, sub, name in FEATURE_REGISTERS:
        lack = reg(wanted, leaf, sub, name) & ~reg(offered, leaf, sub, name)
        if lack:
            out.append(f"leaf {leaf:#x}.{sub} {name} {lack:#x}")
    return out
