"""Bringing up a KVM VM and its vCPUs: the steps every VM osvmm makes shares.

``create_vm`` makes a VM with the pages KVM needs below 4 GiB (TSS and the
identity map, where layout.py puts them), the in-kernel irqchip (LAPICs, I/O
APIC, PIC) with the PC's interrupt wiring that the MP table and MADT describe
(arch/x86/irq.py: the PIT's GSI 0 on I/O APIC pin 2), optionally the PIT, and
registers guest memory as memslots 0..n-1. ``create_vcpu`` makes one vCPU
with its CPUID (TSC-deadline announced where KVM emulates it), the MSRs
firmware would leave (arch/x86/msr.py: MTRRs on, write-back) and, for the
boot processor, the entry registers. A partition (partition.py) and the host probe
(host_quirks.py) both bring up their VMs through these.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from osvmm.arch.x86 import cpuid as x86_cpuid
from osvmm.arch.x86 import irq, layout, msr
from osvmm.arch.x86.regs import EntryState, apply_entry_state
from osvmm.errors import KvmError


def create_vm(kvm, memory, pit: bool = True, register_memory: bool = True, on_created=None):
    """A VM with its irqchip (and PIT) and ``memory``'s regions as memslots 0..n-1
    (with ``register_memory=False``, none yet: ``register_memory_in_background``).
    ``on_created(vm)``: called on the VM as soon as it exists, before its irqchip
    (a partition starts registering its memory there: the memslot's grace period
    then overlaps the irqchip's making); if making the rest fails, the VM is
    closed only after ``on_created``'s return value (a wait function) is called."""
    vm = kvm.create_vm()
    wait = on_created(vm) if on_created is not None else None
    try:
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.set_gsi_routing(irq.gsi_routes())
        if pit:
            vm.create_pit2()
        if register_memory:
            for slot, region in enumerate(memory.regions):
                vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)
    except BaseException:
        if wait is not None:
            try:
                wait()
            except Exception:  # noqa: BLE001, S110 - the first failure is the one reported
                pass
        vm.close()
        raise
    return vm


def register_memory_in_background(vm, memory) -> Callable[[], None]:
    """Register ``memory``'s regions as memslots 0..n-1 on a thread of its own, and
    return the function that waits for it and raises what it raised. Each
    registration waits for an RCU grace period (milliseconds on a nested host, the
    VMM idle), time the caller spends building the rest (devices, image, vCPUs)."""
    failed: list[BaseException] = []

    def register() -> None:
        try:
            for slot, region in enumerate(memory.regions):
                vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)
        except BaseException as err:  # noqa: BLE001 - raised again by wait()
            failed.append(err)

    thread = threading.Thread(target=register, name="memslots", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed[0]

    return wait


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
