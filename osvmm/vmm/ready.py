"""A VM made ready ahead of the partition that will use it, for a fast restore.

Much of a restore's build is KVM making the VM, not the snapshot: on the
development machines (nested KVM) the VM with its memslots, irqchip, GSI routes
and PIT and its vCPUs take about 1.5 ms, more on a loaded host (the PIT starts
a kernel thread; docs/performance.md). None of it depends on the snapshot,
only on the machine (its RAM ranges and vCPUs), so a ``ReadyVm`` does it
before the request:

    address space reserved for each RAM range     memory.reserve (never touched)
    the VM, its RAM memslots on the reservations  KVM_CREATE_VM, KVM_SET_USER_MEMORY_REGION
    as bringup.create_vm makes the rest           TSS, identity map, irqchip, GSI routes, PIT
    the dirty ring (an ``osvmm up`` partition's)  KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)
    the boot processor's APIC ID, the vCPUs       KVM_SET_BOOT_CPU_ID, KVM_CREATE_VCPU

A restore that takes it (``Partition(config, kvm, ready=...)``) maps the
snapshot's memory file over the reservations (MAP_FIXED, private: the same host
addresses, so the memslots stand; KVM follows the change through its MMU
notifier), gives each vCPU its CPUID and state, and starts: no memslot is
registered and no VM created on the way. A ready VM fits one partition only
if that partition's machine is the one it was made for, it resumes a snapshot
read from a directory with its memory mapped (``restore_lazy``), and it asks
for nothing KVM must have before the vCPUs exist (``disable_exits``) other than
the dirty ring it was made with (``dirty_ring``: a migrated partition can
migrate again); one that
does not fit is closed and the partition built as usual (``fits``).
"""

from __future__ import annotations

from osvmm.machine import Machine
from osvmm.vmm.bringup import create_irqchip
from osvmm.vmm.memory import reserve


class ReadyVm:
    """A VM with its irqchip, PIT, RAM memslots on reserved address space and its
    vCPUs, for a partition of ``machine``; owned until a partition takes it."""

    def __init__(self, kvm, machine: Machine, dirty_ring: int = 0):
        self.kvm = kvm
        self.machine = machine
        self.dirty_ring = dirty_ring  # the PartitionConfig.dirty_ring it was made for
        self.slots: list[tuple[int, int, int]] = []  # (gpa, size, host address) per memslot
        self.reserved: dict[int, object] = {}  # gpa -> its reservation, until claimed
        self.vm = None
        self.vcpus: list = []

    @classmethod
    def make(cls, kvm, machine: Machine, dirty_ring: int = 0) -> ReadyVm:
        ready = cls(kvm, machine, dirty_ring)
        try:
            for gpa, size in machine.ram_ranges:
                mem = ready.reserved[gpa] = reserve(size)
                ready.slots.append((gpa, size, _address(mem)))
            vm = ready.vm = kvm.create_vm()
            for slot, (gpa, size, addr) in enumerate(ready.slots):
                vm.set_user_memory_region(slot, gpa, size, addr)
            create_irqchip(vm)  # after the memslots, as create_vm does
            if dirty_ring:  # before any vCPU, as Partition._build does
                from osvmm.vmm.dirty_ring import enable

                enable(vm, dirty_ring)
            vm.set_boot_cpu_id(machine.bsp_apic_id)  # before any vCPU exists
            for apic_id in machine.apic_ids:
                ready.vcpus.append(vm.create_vcpu(apic_id))
        except BaseException:
            ready.close()
            raise
        return ready

    def claim(self, gpa: int):
        """The reservation of the RAM range at ``gpa``: the region mapped over it owns it."""
        return self.reserved.pop(gpa)

    def fits(self, config, snap) -> bool:
        """Whether a partition of ``config`` resuming ``snap`` can take this VM: a
        snapshot mapped from its directory (nothing claimed yet), or an arrival whose
        memory was placed over the reservations (``snap.ready`` is this one)."""
        from osvmm.vmm.snapshot import MEMORY_IMAGE, Snapshot

        if self.vm is None or config.machine != self.machine or config.disable_exits:
            return False
        if config.dirty_ring != self.dirty_ring:
            return False
        if getattr(snap, "ready", None) is self:
            return not self.reserved
        if type(snap) is not Snapshot or not config.restore_lazy:
            return False
        _fd, img = snap.image(MEMORY_IMAGE)
        ranges = [(r["gpa"], r["size"]) for r in img["regions"]]
        return ranges == [(gpa, size) for gpa, size, _ in self.slots] and len(self.reserved) == len(
            self.slots
        )

    def take(self):
        """(vm, vCPUs, the unclaimed reservations by guest-physical address): the
        partition owns them from now on."""
        vm, vcpus, reserved = self.vm, self.vcpus, self.reserved
        self.vm, self.vcpus, self.reserved = None, [], {}
        return vm, vcpus, reserved

    def check(self, memory) -> None:
        """A VmmBug unless ``memory``'s regions lie where the memslots point."""
        from osvmm.errors import VmmBug

        have = [(r.gpa, r.size, r.host_addr) for r in memory.regions]
        if have != self.slots:
            raise VmmBug(f"guest memory is not where the ready VM's memslots are: {have}")

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        for mem in self.reserved.values():
            mem.close()
        self.reserved = {}


def _address(mem) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(mem))
