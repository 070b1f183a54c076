"""The Intel MultiProcessor Specification 1.4 table of a partition.

Linux reads it when ACPI is off (``acpi=off``) or has no MADT; with ACPI it is
a fallback. The floating pointer is found by the kernel's scan of the last KiB
of base memory (0x9fc00, ``layout.MPTABLE_ADDR``), where we place it with the
configuration table right after it:

    addr + 0    floating pointer structure ("_MP_", 16 bytes)
    addr + 16   configuration table header ("PCMP", 44 bytes)
    addr + 60   entries: processors (20 bytes each), then ISA bus, I/O APIC,
                I/O interrupt assignments, local interrupt assignments (8 each)

With up to 40 vCPUs the whole table fits in the EBDA's 1 KiB (0x9fc00-0xa0000).
With more it runs on into 0xa0000 and up, which is still inside the reserved
low area of the e820 map and backed by the partition's RAM mapping; the ACPI
tables begin at 0xe0000, far beyond even 255 processors (5.3 KiB).

Interrupt routing is a PC's: ISA IRQ 0 (the PIT) goes to I/O APIC pin 2, the
other ISA IRQs to the pin of the same number, and IRQ 2 (the 8259 cascade) has
no entry because pin 2 is IRQ 0's (SeaBIOS does the same). IRQ 9 (the ACPI
SCI) is level triggered, active high, as in the MADT. LINT0 of every local
APIC is ExtINT (the 8259 in virtual-wire mode), LINT1 is NMI.
"""

from __future__ import annotations

import struct

from osvmm.arch.x86 import irq as irq_wiring
from osvmm.arch.x86 import layout
from osvmm.machine import Machine

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4  # MP specification 1.4
OEM_ID = b"OSVMM   "  # 8 bytes
PRODUCT_ID = b"PARTITION   "  # 12 bytes

# Entry types (MP spec table 4-3).
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4

# Processor entry: CPU flags and the signature/feature words (CPUID.1 EAX/EDX).
CPU_ENABLED = 0x01
CPU_BSP = 0x02
LAPIC_VERSION = 0x14  # integrated xAPIC, as KVM's local APIC reports
CPU_SIGNATURE = 0x600  # family 6, model 0, stepping 0
CPU_FEATURE_FPU = 1 << 0
CPU_FEATURE_APIC = 1 << 9
CPU_FEATURES = CPU_FEATURE_FPU | CPU_FEATURE_APIC

BUS_ISA = b"ISA   "
ISA_BUS_ID = 0

IOAPIC_VERSION = 0x11  # 82093AA, the version KVM's in-kernel I/O APIC reports
IOAPIC_ENABLED = 0x01

# I/O interrupt types and flags (MP spec tables 4-10 and 4-11).
MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3
MP_IRQ_DEFAULT = 0x0  # polarity and trigger conform to the bus
MP_IRQ_ACTIVE_HIGH = 0x1
MP_IRQ_LEVEL = 0xC
SCI_IRQ = 9
ALL_LAPICS = 0xFF

FLOATING_POINTER_SIZE = 16
HEADER_SIZE = 44
PROCESSOR_ENTRY_SIZE = 20
ENTRY_SIZE = 8


def isa_irq_routes() -> list[tuple[int, int, int]]:
    """(ISA IRQ, I/O APIC pin, MP flags) for each routed ISA IRQ, as on a PC."""
    routes = []
    for irq in range(irq_wiring.ISA_IRQS):
        pin = irq_wiring.isa_pin(irq)
        if pin is None:
            continue  # the 8259 cascade: pin 2 is IRQ 0's
        flags = MP_IRQ_ACTIVE_HIGH | MP_IRQ_LEVEL if irq == SCI_IRQ else MP_IRQ_DEFAULT
        routes.append((irq, pin, flags))
    return routes


def mptable_size(ncpus: int) -> int:
    """Bytes of the floating pointer plus configuration table for ``ncpus`` vCPUs."""
    entries = 1 + 1 + len(isa_irq_routes()) + 2
    return FLOATING_POINTER_SIZE + HEADER_SIZE + ncpus * PROCESSOR_ENTRY_SIZE + entries * ENTRY_SIZE


def _checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to zero mod 256."""
    return -sum(data) & 0xFF


def build_mptable(machine: Machine, addr: int = layout.MPTABLE_ADDR) -> bytes:
    """The floating pointer and configuration table, to be written at ``addr``."""
    entries = []
    for i, apic_id in enumerate(machine.apic_ids):
        flags = CPU_ENABLED | (CPU_BSP if i == 0 else 0)
        entries.append(
            struct.pack(
                "<BBBBII8x",
                MP_PROCESSOR,
                apic_id,
                LAPIC_VERSION,
                flags,
                CPU_SIGNATURE,
                CPU_FEATURES,
            )
        )
    entries.append(struct.pack("<BB6s", MP_BUS, ISA_BUS_ID, BUS_ISA))
    ioapic_id = machine.ioapic_id
    entries.append(
        struct.pack(
            "<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, layout.IOAPIC_ADDR
        )
    )
    for irq, pin, flags in isa_irq_routes():
        entries.append(
            struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, flags, ISA_BUS_ID, irq, ioapic_id, pin)
        )
    for kind, lint in ((MP_EXTINT, 0), (MP_NMI, 1)):
        entries.append(
            struct.pack(
                "<BBHBBBB", MP_LINTSRC, kind, MP_IRQ_DEFAULT, ISA_BUS_ID, 0, ALL_LAPICS, lint
            )
        )
    body = b"".join(entries)
    length = HEADER_SIZE + len(body)
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBx",
            MPC_SIGNATURE,
            length,
            MP_SPEC_REV,
            0,  # checksum, below
            OEM_ID,
            PRODUCT_ID,
            0,  # OEM table pointer
            0,  # OEM table size
            len(entries),
            layout.LAPIC_ADDR,
            0,  # extended table length
            0,  # extended table checksum
        )
    )
    assert len(header) == HEADER_SIZE
    header[7] = _checksum(bytes(header) + body)
    config = bytes(header) + body

    floating = bytearray(
        struct.pack(
            "<4sIBBB5B",
            MPF_SIGNATURE,
            addr + FLOATING_POINTER_SIZE,  # physical address of the configuration table
            1,  # length in 16-byte paragraphs
            MP_SPEC_REV,
            0,  # checksum, below
            0,  # feature byte 1: 0 = a configuration table is present
            0,  # feature byte 2: IMCRP clear = virtual-wire mode
            0,
            0,
            0,
        )
    )
    assert len(floating) == FLOATING_POINTER_SIZE
    floating[10] = _checksum(bytes(floating))
    table = bytes(floating) + config
    assert len(table) == mptable_size(len(machine.apic_ids))
    return table
