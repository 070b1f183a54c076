"""How a partition's ISA interrupts reach the interrupt controllers: one fact, read
by the MP table, the MADT and the VM's GSI routing.

A PC's wiring, as SeaBIOS and QEMU describe it: ISA IRQ 0 (the PIT) arrives
on I/O APIC pin 2 (ACPI's Interrupt Source Override, the MP table's I/O
interrupt entry), every other ISA IRQ on the pin of its own number, and IRQ 2
(the 8259 cascade) has no I/O APIC pin of its own because pin 2 is IRQ 0's.

KVM numbers interrupt sources by GSI; the in-kernel PIT raises GSI 0 and a
device model raises GSI n for ISA IRQ n. KVM's default routing sends GSI 0 to
I/O APIC pin 0, which is not what the tables tell the guest, so the VMM
installs ``gsi_routes()`` (KVM_SET_GSI_ROUTING): GSI n to 8259 pin n (n < 16,
n != 2) and to I/O APIC pin ``isa_pin(n)``, GSIs 16..23 to pins 16..23.

Devices of the VMM's own (virtio-mmio) take ISA IRQs no PC device of a
partition uses, ``VIRTIO_IRQS``: Linux maps an ISA IRQ to its I/O APIC pin
from the MADT and MP table by itself (edge, active high, as KVM's irqfd
raises it), while a pin of 16..23 gets a Linux IRQ number only through
ACPI's _PRT or a DSDT device, which osvmm does not describe. Left out: 0
(PIT), 1 and 12 (i8042), 2 (cascade), 3 (COM2, which Linux probes), 4 (COM1),
8 (RTC), 9 (ACPI SCI) and 13 (FPU error).
"""

from __future__ import annotations

IOAPIC_PINS = 24
ISA_IRQS = 16
CASCADE_IRQ = 2  # the slave 8259's line into the master: no device uses it
PIT_IRQ = 0
# ISA IRQs (and I/O APIC pins: isa_pin is the identity for them) of virtio-mmio
# devices, in device order (devices/virtio/mmio.py slot()).
VIRTIO_IRQS = (5, 6, 7, 10, 11, 14, 15)

# kvm_irq_routing_irqchip.irqchip values (KVM_IRQCHIP_* in kvm.h).
PIC_MASTER, PIC_SLAVE, IOAPIC = 0, 1, 2


def isa_pin(irq: int) -> int | None:
    """The I/O APIC pin ISA IRQ ``irq`` arrives on (None for the cascade)."""
    if irq == CASCADE_IRQ:
        return None
    return CASCADE_IRQ if irq == PIT_IRQ else irq


def isa_overrides() -> list[tuple[int, int]]:
    """(ISA IRQ, GSI) pairs where the pin differs from the IRQ number."""
    return [(irq, isa_pin(irq)) for irq in range(ISA_IRQS) if isa_pin(irq) not in (irq, None)]


def gsi_routes() -> list[tuple[int, int, int]]:
    """(GSI, irqchip, pin) for every route of the PC wiring, as QEMU installs them."""
    routes = []
    for gsi in range(ISA_IRQS):
        if gsi != CASCADE_IRQ:
            routes.append((gsi, PIC_MASTER if gsi < 8 else PIC_SLAVE, gsi % 8))
    for gsi in range(IOAPIC_PINS):
        pin = isa_pin(gsi) if gsi < ISA_IRQS else gsi
        if pin is not None:
            routes.append((gsi, IOAPIC, pin))
    return routes
