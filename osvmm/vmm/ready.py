"""A VM made ready ahead of the partition that will use it, for a fast restore.

Most of a restore's build is KVM making the VM, not the snapshot: on the
development machines (nested KVM) registering a memslot waits for an SRCU grace
period, 4-6 ms whatever its size, and the VM with its irqchip, GSI routes and
PIT another millisecond (docs/performance.md). None of it depends on the
snapshot, only on the machine (its RAM ranges and vCPUs), so a ``ReadyVm``
does it before the request:

    address space reserved for each RAM range     memory.reserve (never touched)
    the VM, as bringup.create_vm makes it         TSS, identity map, irqchip, GSI routes, PIT
    its RAM memslots, on the reservations         KVM_SET_USER_MEMORY_REGION
    the boot processor's APIC ID, the vCPUs       KVM_SET_BOOT_CPU_ID, KVM_CREATE_VCPU

A restore that takes it (``Partition(config, kvm, ready=...)``) maps the
snapshot's memory file over the reservations (MAP_FIXED, private: the same host
addresses, so the memslots stand; KVM follows the change through its MMU
notifier), gives each vCPU its CPUID and state, and starts: no memslot is
registered and no VM created on the way. A ready VM fits one partition only
if that partition's machine is the one it was made for, it resumes a snapshot
read from a directory with its memory mapped (``restore_lazy``), and it asks
for nothing KVM must have before the vCPUs exist (``disable_exits``); one that
does not fit is closed and the partition built as usual (``fits``).
"""

from __future__ import annotations

from osvmm.machine import Machine
from osvmm.vmm.bringup import create_vm
from osvmm.vmm.memory import reserve


class ReadyVm:
    """A VM with its irqchip, PIT, RAM memslots on reserved address space and its
    vCPUs, for a partition of ``machine``; owned until a partition takes it."""

    def __init__(self, kvm, machine: Machine):
        self.kvm = kvm
        self.machine = machine
        self.reserved: list[tuple[int, int, object]] = []  # (gpa, size, reservation)
        self.vm = None
        self.vcpus: list = []

    @classmethod
    def make(cls, kvm, machine: Machine) -> ReadyVm:
        ready = cls(kvm, machine)
        try:
            for gpa, size in machine.ram_ranges:
                ready.reserved.append((gpa, size, reserve(size)))
            vm = ready.vm = create_vm(kvm, None, register_memory=False)
            for slot, (gpa, size, mem) in enumerate(ready.reserved):
                vm.set_user_memory_region(slot, gpa, size, _address(mem))
            vm.set_boot_cpu_id(machine.bsp_apic_id)  # before any vCPU exists
            for apic_id in machine.apic_ids:
                ready.vcpus.append(vm.create_vcpu(apic_id))
        except BaseException:
            ready.close()
            raise
        return ready

    def fits(self, config, snap) -> bool:
        """Whether a partition of ``config`` resuming ``snap`` can take this VM."""
        from osvmm.vmm.snapshot import MEMORY_IMAGE, Snapshot

        if self.vm is None or not isinstance(snap, Snapshot) or not config.restore_lazy:
            return False
        if config.machine != self.machine or config.disable_exits:
            return False
        _fd, img = snap.image(MEMORY_IMAGE)
        ranges = [(r["gpa"], r["size"]) for r in img["regions"]]
        return ranges == [(gpa, size) for gpa, size, _ in self.reserved]

    def take(self):
        """(vm, vCPUs, reservations by guest-physical address): the partition owns
        them from now on."""
        vm, vcpus = self.vm, self.vcpus
        reserved = {gpa: mem for gpa, _size, mem in self.reserved}
        self.vm, self.vcpus, self.reserved = None, [], []
        return vm, vcpus, reserved

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        for _gpa, _size, mem in self.reserved:
            mem.close()
        self.reserved = []


def _address(mem) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(mem))
