"""Bringing up a KVM VM and its vCPUs: the steps every VM osvmm makes shares.

``create_vm`` makes a VM with the pages KVM needs below 4 GiB (TSS and the
identity map, where layout.py puts them), the in-kernel irqchip (LAPICs, I/O
APIC, PIC) with the PC's interrupt wiring that the MP table and MADT describe
(arch/x86/irq.py: the PIT's GSI 0 on I/O APIC pin 2), optionally the PIT, and
registers guest memory as memslots 0..n-1 (first: see ``create_vm``).
``create_vcpu`` makes one vCPU with its CPUID (TSC-deadline announced where KVM
emulates it), the MSRs firmware would leave (arch/x86/msr.py: MTRRs on,
write-back) and, for the boot processor, the entry registers. A partition
(partition.py) and the host probe (host_quirks.py) both bring up their VMs
through these.
"""

from __future__ import annotations

import errno

from osvmm.arch.x86 import cpuid as x86_cpuid
from osvmm.arch.x86 import irq, layout, msr
from osvmm.arch.x86.regs import EntryState, apply_entry_state
from osvmm.errors import KvmError


def create_vm(kvm, memory, pit: bool = True):
    """A VM with ``memory``'s regions as memslots 0..n-1 and its irqchip (and PIT).

    The memslots go in first, before the irqchip: on the development machines
    (nested KVM) a memslot registered on a VM without an irqchip took 0.06-0.2
    ms, one registered after KVM_CREATE_IRQCHIP 6-7 ms (KVM then waits for a
    grace period), whatever the size (docs/performance.md)."""
    vm = kvm.create_vm()
    try:
        for slot, region in enumerate(memory.regions):
            vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)
        create_irqchip(vm, pit)
    except BaseException:
        vm.close()
        raise
    return vm


def create_irqchip(vm, pit: bool = True) -> None:
    """``vm``'s TSS and identity map pages, irqchip with the PC's GSI routes, and PIT:
    after its memslots (``create_vm``)."""
    vm.set_tss_addr(layout.KVM_TSS_ADDR)
    vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
    vm.create_irqchip()
    vm.set_gsi_routing(irq.gsi_routes())
    if pit:
        vm.create_pit2()


def create_vcpu(
    vm,
    supported_cpuid,
    apic_id: int,
    vcpus: int,
    cpuid_mask: tuple[str, ...] = (),
    entry: EntryState | None = None,
    tsc_deadline: bool = False,
    cpuid=None,
    made=None,
):
    """A vCPU with APIC ID ``apic_id`` of ``vcpus``; ``entry``: the boot processor's
    registers at entry (the others wait for INIT/SIPI in their LAPIC). ``cpuid``:
    these CPUID entries instead (a restored vCPU keeps the ones it had). ``made``:
    that vCPU, created ahead and never run (vmm/ready.py), set up instead of a new one."""
    vcpu = made if made is not None else vm.create_vcpu(apic_id)
    try:
        if cpuid is None:
            cpuid = x86_cpuid.vcpu_cpuid(supported_cpuid, apic_id, vcpus, cpuid_mask, tsc_deadline)
        vcpu.set_cpuid(cpuid)
        set_boot_msrs(vcpu)  # after CPUID: KVM checks MSRs against it
        if entry is not None:
            sregs, regs = vcpu.get_sregs(), vcpu.get_regs()
            regs.__init__()  # all general registers zero but what the entry sets
            apply_entry_state(entry, sregs, regs)
            vcpu.set_sregs(sregs)
            vcpu.set_regs(regs)
    except BaseException:
        vcpu.close()
        raise
    return vcpu


def set_boot_msrs(vcpu) -> None:
    """The MSRs a vCPU starts with (arch/x86/msr.py: the MTRRs enabled, write-back),
    as firmware leaves them; KvmError naming the first MSR KVM refused."""
    values = list(msr.boot_msrs().items())
    done = vcpu.set_msrs(values)
    if done != len(values):
        raise KvmError(errno.EINVAL, f"KVM_SET_MSRS (MSR {values[done][0]:#x} refused)")
