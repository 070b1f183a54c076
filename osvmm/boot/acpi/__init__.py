"""The partition's ACPI tables, built as one blob placed at ``layout.ACPI_TABLES_ADDR``.

Blob layout (offsets from the base address):

    0x00   RSDP (36 bytes, first: the legacy scan of 0xe0000-0xfffff finds it)
    0x40   FACS (64 bytes, 64-byte aligned)
    0x80   XSDT -> FADT, MADT, [SRAT, SLIT]
    ...    FADT -> DSDT, FACS; DSDT; MADT; SRAT and SLIT (more than one NUMA node)

each table 16-byte aligned. ``build_acpi`` returns the blob, the RSDP's
address (for boot_params.acpi_rsdp_addr and hvm_start_info.rsdp_paddr), and
each table with its address (for tests and ``tests/golden_gen.py``).
"""

from __future__ import annotations

from osvmm.arch.x86 import layout
from osvmm.boot.acpi.dsdt import build_dsdt
from osvmm.boot.acpi.fadt import FACS_ALIGN, FACS_SIZE, FADT_SIZE, build_facs, build_fadt
from osvmm.boot.acpi.madt import build_madt
from osvmm.boot.acpi.numa import build_slit, build_srat
from osvmm.boot.acpi.rsdp import RSDP_SIZE, build_rsdp, build_xsdt, xsdt_size
from osvmm.errors import ConfigError
from osvmm.machine import Machine
from osvmm.records import Frozen

TABLE_ALIGN = 16


class AcpiTables(Frozen):
    """The ACPI blob and where it and each of its tables go in guest-physical memory."""

    addr: int
    data: bytes
    rsdp_addr: int
    # signature ("RSDP", "FACS", "XSDT", "FACP", "DSDT", "APIC", "SRAT", "SLIT") -> (addr, bytes)
    tables: dict[str, tuple[int, bytes]]


def _align(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def build_acpi(machine: Machine, base_addr: int = layout.ACPI_TABLES_ADDR) -> AcpiTables:
    """Every ACPI table of the partition, RSDP first at ``base_addr`` (16-byte aligned)."""
    if base_addr % FACS_ALIGN:
        raise ConfigError(f"ACPI tables base {base_addr:#x} is not 64-byte aligned")
    dsdt = build_dsdt(machine)
    facs = build_facs()
    pointed = [("APIC", build_madt(machine))]
    if len(machine.numa_nodes) > 1:
        pointed += [("SRAT", build_srat(machine)), ("SLIT", build_slit(machine))]

    # Place everything; sizes do not depend on addresses.
    addrs: dict[str, int] = {"RSDP": base_addr}
    at = _align(base_addr + RSDP_SIZE, FACS_ALIGN)
    addrs["FACS"] = at
    at = _align(at + FACS_SIZE, TABLE_ALIGN)
    addrs["XSDT"] = at
    at = _align(at + xsdt_size(1 + len(pointed)), TABLE_ALIGN)
    addrs["FACP"] = at
    at = _align(at + FADT_SIZE, TABLE_ALIGN)
    addrs["DSDT"] = at
    at = _align(at + len(dsdt), TABLE_ALIGN)
    for sig, data in pointed:
        addrs[sig] = at
        at = _align(at + len(data), TABLE_ALIGN)
    if at - base_addr > layout.ACPI_TABLES_MAX:
        raise ConfigError(
            f"the ACPI tables need {at - base_addr:#x} bytes, more than {layout.ACPI_TABLES_MAX:#x}"
        )

    tables = {
        "RSDP": build_rsdp(addrs["XSDT"]),
        "FACS": facs,
        "XSDT": build_xsdt([addrs["FACP"]] + [addrs[sig] for sig, _ in pointed]),
        "FACP": build_fadt(addrs["DSDT"], addrs["FACS"]),
        "DSDT": dsdt,
    }
    tables.update(pointed)
    blob = bytearray(at - base_addr)
    for sig, data in tables.items():
        off = addrs[sig] - base_addr
        blob[off : off + len(data)] = data
    return AcpiTables(
        addr=base_addr,
        data=bytes(blob),
        rsdp_addr=addrs["RSDP"],
        tables={sig: (addrs[sig], data) for sig, data in tables.items()},
    )
