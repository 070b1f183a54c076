"""Reset images: a built VM and its vCPUs as they were before their first run,
captured once and put back before every later boot of a partition kept built.

``osvmm up`` keeps a stopped partition built (partition.py ``recycle``): its
memory, VM, memslots, irqchip and vCPUs stay, and the next ``start`` puts
back what a guest can change and a later boot could see. What KVM holds is
read right after ``Partition.build`` (``ResetImage.capture``: the boot
processor already at its entry registers) and written back by
``ResetImage.apply``, in this order (QEMU's order for the vCPU part):

    PIT          KVM_SET_PIT2: counters and modes; its timer stops
    each vCPU    general registers, XSAVE (FPU, SSE, AVX) or the FPU alone,
                 XCR0, segment and control registers with EFER and the APIC
                 base, every MSR KVM saves (KVM_GET_MSR_INDEX_LIST: the TSC,
                 SYSCALL targets, PAT, TSC deadline, and kvmclock and the
                 other paravirtual MSRs that point into guest memory), the MP
                 state (the BSP runnable, APs waiting for INIT/SIPI), the
                 LAPIC (its timer stops, nothing pending), pending events
                 (exceptions, NMIs, a latched INIT), debug registers
    irqchip      both PICs and the I/O APIC (KVM_SET_IRQCHIP): masks,
                 pending and in-service bits, the redirection table
    kvmclock     KVM_SET_CLOCK to 0, as for a new VM

Guest memory, the device models and the memslots are the partition's
business (``Partition.recycle``). A capability this KVM lacks leaves its
part out of both capture and apply (``missing`` names it), except the
vCPU registers, LAPIC, MP state and irqchip, which every host osvmm runs
on has.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from osvmm.errors import VmmBug
from osvmm.kvm import ioctls as io
from osvmm.kvm import structs as s
from osvmm.kvm.system import Kvm, Vcpu, Vm

IRQCHIPS = (s.KVM_IRQCHIP_PIC_MASTER, s.KVM_IRQCHIP_PIC_SLAVE, s.KVM_IRQCHIP_IOAPIC)


def restorable_msrs(vcpu: Vcpu, indices: list[int]) -> list[tuple[int, int]]:
    """(index, value) of the MSRs of ``indices`` this vCPU lets the host read and write
    back unchanged (KVM_GET_MSRS and KVM_SET_MSRS stop at the first they refuse: that
    one is left out and the rest tried again). Run on a vCPU that has not run yet."""
    out: list[tuple[int, int]] = []
    rest = list(indices)
    while rest:
        values = vcpu.get_msrs(rest)
        n = vcpu.set_msrs(values) if values else 0
        out += values[:n]
        rest = rest[n + 1 :]
    return out


@dataclass
class VcpuImage:
    """One vCPU's state as captured; ``apply`` writes it back."""

    regs: s.kvm_regs
    sregs: s.kvm_sregs
    msrs: list[tuple[int, int]]  # (index, value)
    lapic: s.kvm_lapic_state
    mp_state: int
    xsave: ctypes.Structure | None = None  # a kvm_xsave (larger with KVM_CAP_XSAVE2)
    fpu: s.kvm_fpu | None = None  # where KVM has no XSAVE
    xcrs: s.kvm_xcrs | None = None
    events: s.kvm_vcpu_events | None = None
    debugregs: s.kvm_debugregs | None = None

    @classmethod
    def capture(cls, vcpu: Vcpu, msr_indices: list[int], caps: dict[str, int]) -> VcpuImage:
        img = cls(
            regs=vcpu.get_regs(),
            sregs=vcpu.get_sregs(),
            msrs=vcpu.get_msrs(msr_indices),
            lapic=vcpu.get_lapic(),
            mp_state=vcpu.get_mp_state(),
        )
        if caps["xsave"]:
            img.xsave = vcpu.get_xsave(caps["xsave2"] or ctypes.sizeof(s.kvm_xsave))
        else:
            img.fpu = vcpu.get_fpu()
        if caps["xcrs"]:
            img.xcrs = vcpu.get_xcrs()
        if caps["events"]:
            img.events = vcpu.get_vcpu_events()
        if caps["debugregs"]:
            img.debugregs = vcpu.get_debugregs()
        return img

    def apply(self, vcpu: Vcpu) -> None:
        vcpu.set_regs(self.regs)
        if self.xsave is not None:
            vcpu.set_xsave(self.xsave)
        else:
            vcpu.set_fpu(self.fpu)
        if self.xcrs is not None:
            vcpu.set_xcrs(self.xcrs)
        vcpu.set_sregs(self.sregs)
        written = vcpu.set_msrs(self.msrs)
        if written != len(self.msrs):
            index = self.msrs[written][0]
            raise VmmBug(f"vcpu {vcpu.id}: KVM refused MSR {index:#x} of its reset image")
        vcpu.set_mp_state(self.mp_state)
        vcpu.set_lapic(self.lapic)
        if self.events is not None:
            vcpu.set_vcpu_events(self.events)
        if self.debugregs is not None:
            vcpu.set_debugregs(self.debugregs)


@dataclass
class ResetImage:
    """A whole VM's reset image: its interrupt controllers, PIT and vCPUs."""

    irqchips: list[s.kvm_irqchip]
    pit: s.kvm_pit_state2 | None
    vcpus: list[VcpuImage]
    clock: bool  # KVM_SET_CLOCK works here
    missing: tuple[str, ...] = field(default=())  # capabilities this KVM lacks

    @classmethod
    def capture(cls, kvm: Kvm, vm: Vm, vcpus: list[Vcpu], pit: bool = True) -> ResetImage:
        """Read the state of ``vm`` and ``vcpus`` (built, never run) to put it back later."""
        caps = {
            "xsave": vm.check_extension(io.KVM_CAP_XSAVE),
            "xsave2": vm.check_extension(io.KVM_CAP_XSAVE2),  # its size where over 4 KiB
            "xcrs": vm.check_extension(io.KVM_CAP_XCRS),
            "events": vm.check_extension(io.KVM_CAP_VCPU_EVENTS),
            "debugregs": vm.check_extension(io.KVM_CAP_DEBUGREGS),
            "pit": pit,  # created with KVM_CREATE_PIT2, which came with KVM_GET/SET_PIT2
            "clock": vm.check_extension(io.KVM_CAP_ADJUST_CLOCK),
        }
        indices = [i for i, _ in restorable_msrs(vcpus[0], kvm.msr_index_list())] if vcpus else []
        return cls(
            irqchips=[vm.get_irqchip(chip) for chip in IRQCHIPS],
            pit=vm.get_pit2() if caps["pit"] else None,
            vcpus=[VcpuImage.capture(v, indices, caps) for v in vcpus],
            clock=bool(caps["clock"]),
            missing=tuple(
                name for name in ("xsave", "xcrs", "events", "debugregs", "clock") if not caps[name]
            ),
        )

    def apply(self, vm: Vm, vcpus: list[Vcpu]) -> None:
        """Put the captured state back (every vCPU out of KVM_RUN, its pending
        operation completed: ``Vcpu.complete_pending``)."""
        if len(vcpus) != len(self.vcpus):
            raise VmmBug(f"reset image of {len(self.vcpus)} vCPUs applied to {len(vcpus)}")
        if self.pit is not None:
            vm.set_pit2(self.pit)
        for vcpu, img in zip(vcpus, self.vcpus, strict=True):
            img.apply(vcpu)
        for chip in self.irqchips:
            vm.set_irqchip(chip)
        if self.clock:
            vm.set_clock(s.kvm_clock_data(clock=0))
