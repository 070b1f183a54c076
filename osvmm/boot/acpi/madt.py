"""MADT (signature "APIC"): the partition's local APICs, its I/O APIC and interrupt routing.

One Processor Local APIC entry per vCPU, in vCPU order: processor UID i (the
DSDT's processor device C00i), APIC ID from the machine, enabled. One I/O APIC
(ID ``machine.ioapic_id``, GSI base 0). Interrupt Source Overrides as QEMU gives
them: ISA IRQ 0 -> GSI 2 (the PIT on I/O APIC pin 2), and IRQ 9 -> GSI 9
level triggered, active high (the SCI). One Local APIC NMI entry: LINT1 of
every processor. PCAT_COMPAT is set: there are 8259s to mask.
"""

from __future__ import annotations

import struct

from osvmm.arch.x86 import irq as irq_wiring
from osvmm.arch.x86 import layout
from osvmm.boot.acpi import pm
from osvmm.boot.acpi.common import table
from osvmm.machine import Machine

MADT_REVISION = 3  # ACPI 5.0 layout; we use no entry newer than ACPI 1.0
PCAT_COMPAT = 1 << 0

PROCESSOR_LOCAL_APIC = 0
IO_APIC = 1
INTERRUPT_SOURCE_OVERRIDE = 2
LOCAL_APIC_NMI = 4

LAPIC_ENABLED = 1 << 0
ISA_BUS = 0
# MPS INTI flags (ACPI 6.4 table 5.50).
INTI_CONFORMS = 0x0
INTI_ACTIVE_HIGH = 0x1
INTI_LEVEL = 0xC
ALL_PROCESSORS = 0xFF


def interrupt_overrides() -> list[tuple[int, int, int]]:
    """(ISA IRQ, GSI, INTI flags) of each Interrupt Source Override."""
    return [(irq, gsi, INTI_CONFORMS) for irq, gsi in irq_wiring.isa_overrides()] + [
        (pm.SCI_IRQ, pm.SCI_IRQ, INTI_LEVEL | INTI_ACTIVE_HIGH),
    ]


def build_madt(machine: Machine) -> bytes:
    body = struct.pack("<II", layout.LAPIC_ADDR, PCAT_COMPAT)
    for uid, apic_id in enumerate(machine.apic_ids):
        body += struct.pack("<BBBBI", PROCESSOR_LOCAL_APIC, 8, uid, apic_id, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", IO_APIC, 12, machine.ioapic_id, 0, layout.IOAPIC_ADDR, 0)
    for irq, gsi, flags in interrupt_overrides():
        body += struct.pack("<BBBBIH", INTERRUPT_SOURCE_OVERRIDE, 10, ISA_BUS, irq, gsi, flags)
    body += struct.pack("<BBBHB", LOCAL_APIC_NMI, 6, ALL_PROCESSORS, INTI_CONFORMS, 1)
    return table(b"APIC", MADT_REVISION, body)
