"""The DSDT: a small AML definition block assembled byte for byte.

What it declares, as iasl disassembles it:

    DefinitionBlock ("", "DSDT", 2, "OSVMM ", "OSVMDSDT", 1)
    {
        Name (_S5, Package (0x04) { S5_SLP_TYP, S5_SLP_TYP, Zero, Zero })
        Scope (\\_SB)
        {
            Device (C000) { Name (_HID, "ACPI0007")  Name (_UID, Zero) }
            ...one processor device per vCPU, _UID = the MADT's processor UID
            Device (VR00)
            {
                Name (_HID, "LNRO0005")
                Name (_UID, Zero)
                Name (_CRS, ResourceTemplate ()
                {
                    Memory32Fixed (ReadWrite, 0xC0000000, 0x00001000)
                    Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 5 }
                })
            }
            ...one per virtio-mmio device (layout.virtio_mmio_slot)
        }
    }

``\\_S5_`` is what Linux's ACPI power-off reads for SLP_TYP (osvmm.boot.acpi.pm).
The processor devices (ACPI 6 style, not the deprecated Processor op) let the
OS's processor driver match each MADT entry to a namespace object.

The virtio-mmio devices are announced here, as Firecracker's ACPI tables do:
``LNRO0005`` is the _HID Linux's virtio_mmio driver matches (its ACPI table),
and ACPI enumeration makes each a platform device with its page and IRQ. The
other way, the kernel command line's ``virtio_mmio.device=4K@BASE:IRQ``, needs
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, which Debian's kernels do not set (6.1.0-57:
"# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set", and its virtio_mmio.ko has
no ``device`` parameter), so Debian's stock kernel would never see the devices;
a _CRS buffer is constant bytes, no AML method, so the table stays as simple.
"""

from __future__ import annotations

from osvmm.arch.x86 import layout
from osvmm.boot.acpi import aml, pm
from osvmm.boot.acpi.common import table
from osvmm.machine import Machine

DSDT_REVISION = 2  # 64-bit AML integers
PROCESSOR_HID = "ACPI0007"
VIRTIO_MMIO_HID = "LNRO0005"  # Linux's drivers/virtio/virtio_mmio.c ACPI match


def processor_device_name(uid: int) -> str:
    """C000, C001, ... (hex, as QEMU names its CPU devices)."""
    return f"C{uid:03X}"


def virtio_device_name(index: int) -> str:
    return f"VR{index:02X}"


def virtio_devices(machine: Machine) -> list[bytes]:
    out = []
    for index in range(machine.virtio_mmio):
        base, irq = layout.virtio_mmio_slot(index)
        crs = aml.resource_template(
            aml.memory32_fixed(base, layout.VIRTIO_MMIO_SIZE), aml.interrupt(irq)
        )
        out.append(
            aml.device(
                virtio_device_name(index),
                aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
                aml.name("_UID", aml.integer(index)),
                aml.name("_CRS", crs),
            )
        )
    return out


def build_dsdt(machine: Machine) -> bytes:
    s5 = aml.name(
        "_S5",
        aml.package(
            aml.integer(pm.S5_SLP_TYP),
            aml.integer(pm.S5_SLP_TYP),
            aml.integer(0),
            aml.integer(0),
        ),
    )
    cpus = [
        aml.device(
            processor_device_name(uid),
            aml.name("_HID", aml.string(PROCESSOR_HID)),
            aml.name("_UID", aml.integer(uid)),
        )
        for uid in range(len(machine.apic_ids))
    ]
    devices = cpus + virtio_devices(machine)
    return table(b"DSDT", DSDT_REVISION, s5 + aml.scope("\\_SB", *devices))
