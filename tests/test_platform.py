"""The PC platform a partition's tables describe is the one KVM gives it.

- The PIT's interrupt (ISA IRQ 0) arrives on I/O APIC pin 2, where the MADT's
  interrupt source override and the MP table say it does: osvmm installs the
  PC's GSI routing (arch/x86/irq.py). Without it KVM's default routing sends
  GSI 0 to pin 0, and Linux's timer check fails ("APIC timer disabled due to
  verification failure"), its clock then stands still.
- The TSC-deadline timer is announced in CPUID where KVM emulates it.
- Every vCPU starts with the MTRRs enabled, write-back by default, as firmware
  leaves them: KVM starts with IA32_MTRR_DEF_TYPE 0, and Linux then turns PAT
  off too ("x86/PAT: MTRRs disabled, skipping PAT initialization too.").
"""

from __future__ import annotations

import struct

import pytest

from osvmm.arch.x86 import irq, layout
from osvmm.arch.x86.cpuid import TSC_DEADLINE_BIT, vcpu_cpuid
from osvmm.boot.acpi.madt import build_madt
from osvmm.boot.mptable import build_mptable
from osvmm.kvm.structs import kvm_cpuid_entry2
from osvmm.machine import Machine
from tests.helpers import run_osvmm

MP_INTSRC, MP_INT = 3, 0


def mp_isa_routes(blob: bytes) -> dict[int, int]:
    """ISA IRQ -> I/O APIC pin from the MP table's I/O interrupt entries (spec 4.3.4)."""
    pcmp = struct.unpack_from("<I", blob, 4)[0] - layout.MPTABLE_ADDR
    count = struct.unpack_from("<H", blob, pcmp + 34)[0]
    off, routes = pcmp + 44, {}
    for _ in range(count):
        kind = blob[off]
        if kind == 0:
            off += 20
            continue
        if kind == MP_INTSRC:
            _, itype, _, _, irq_no, _, pin = struct.unpack_from("<BBHBBBB", blob, off)
            if itype == MP_INT:
                routes[irq_no] = pin
        off += 8
    return routes


def madt_overrides(blob: bytes) -> dict[int, int]:
    off, out = 44, {}
    while off < len(blob):
        kind, length = blob[off], blob[off + 1]
        if kind == 2:  # Interrupt Source Override
            _, _, _, source, gsi, _ = struct.unpack_from("<BBBBIH", blob, off)
            out[source] = gsi
        off += length
    return out


def test_gsi_routing_matches_the_mp_table_and_madt():
    machine = Machine.build(64 << 20, 2)
    ioapic = {gsi: pin for gsi, chip, pin in irq.gsi_routes() if chip == irq.IOAPIC}
    mp = mp_isa_routes(build_mptable(machine))
    overrides = madt_overrides(build_madt(machine))
    for isa_irq, pin in mp.items():
        assert ioapic[isa_irq] == pin, f"ISA IRQ {isa_irq}: MP table pin {pin}"
        gsi = overrides.get(isa_irq, isa_irq)  # ACPI: identity unless overridden
        assert gsi == pin, f"ISA IRQ {isa_irq}: MADT GSI {gsi}, routed to pin {pin}"
    assert ioapic[0] == 2 and 2 not in ioapic  # the PIT on pin 2; GSI 2 is nothing's
    assert {(g, c) for g, c, _ in irq.gsi_routes()} >= {(0, irq.PIC_MASTER), (4, irq.PIC_MASTER)}


def test_tsc_deadline_is_announced_only_when_asked():
    leaf1 = kvm_cpuid_entry2(function=1)
    (plain,) = vcpu_cpuid([leaf1], 0, 1)
    (deadline,) = vcpu_cpuid([leaf1], 0, 1, tsc_deadline=True)
    assert not plain.ecx >> TSC_DEADLINE_BIT & 1
    assert deadline.ecx >> TSC_DEADLINE_BIT & 1


@pytest.mark.kvm
def test_the_pit_interrupts_on_pin_2_and_tsc_deadline_is_announced():
    from osvmm.kvm import Kvm

    kvm = Kvm()
    try:
        deadline = kvm.tsc_deadline_timer()
    finally:
        kvm.close()
    r = run_osvmm("run", "guests:platform", timeout=120)
    assert r.stdout.decode() == (
        f"platform: tsc_deadline={int(deadline)}\nplatform: pit on pin 2: yes\n"
    ), r.stderr
    assert r.returncode == 1


def test_boot_msrs_enable_the_mtrrs_write_back():
    from osvmm.arch.x86 import msr

    assert msr.boot_msrs() == {0x2FF: 0x806}  # E (bit 11) | type 6, write-back


@pytest.mark.kvm
def test_every_vcpu_starts_with_the_mtrrs_enabled_write_back():
    from osvmm.arch.x86.msr import IA32_MTRR_DEF_TYPE
    from osvmm.kvm import Kvm
    from osvmm.vmm.bringup import create_vcpu, create_vm
    from osvmm.vmm.memory import GuestMemory

    kvm = Kvm()
    mem = GuestMemory([(0, 2 << 20)])
    vm = create_vm(kvm, mem, pit=False)
    vcpus = []
    try:
        supported = kvm.supported_cpuid()
        vcpus = [create_vcpu(vm, supported, i, 2) for i in range(2)]
        for vcpu in vcpus:
            assert dict(vcpu.get_msrs([IA32_MTRR_DEF_TYPE])) == {IA32_MTRR_DEF_TYPE: 0x806}
    finally:
        for vcpu in vcpus:
            vcpu.close()
        vm.close()
        mem.close()
        kvm.close()
