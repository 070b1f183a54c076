"""The DSDT: a small AML definition block assembled byte for byte.

What it declares, as iasl disassembles it:

    DefinitionBlock ("", "DSDT", 2, "OSVMM ", "OSVMDSDT", 1)
    {
        Name (_S5, Package (0x04) { S5_SLP_TYP, S5_SLP_TYP, Zero, Zero })
        Scope (\\_SB)
        {
            Device (C000) { Name (_HID, "ACPI0007")  Name (_UID, Zero) }
            ...one processor device per vCPU, _UID = the MADT's processor UID
        }
    }

``\\_S5_`` is what Linux's ACPI power-off reads for SLP_TYP (osvmm.boot.acpi.pm).
The processor devices (ACPI 6 style, not the deprecated Processor op) let the
OS's processor driver match each MADT entry to a namespace object.
"""

from __future__ import annotations

from osvmm.boot.acpi import aml, pm
from osvmm.boot.acpi.common import table
from osvmm.machine import Machine

DSDT_REVISION = 2  # 64-bit AML integers
PROCESSOR_HID = "ACPI0007"


def processor_device_name(uid: int) -> str:
    """C000, C001, ... (hex, as QEMU names its CPU devices)."""
    return f"C{uid:03X}"


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
    return table(b"DSDT", DSDT_REVISION, s5 + aml.scope("\\_SB", *cpus))
