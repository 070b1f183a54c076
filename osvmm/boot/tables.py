"""One call for the VMM: every firmware table of a partition, with its guest-physical address.

    tables = build_boot_tables(machine)
    for gpa, data in tables.regions:
        memory.write(gpa, data)
    zero_page = build_zero_page(machine, ..., rsdp_addr=tables.rsdp_addr)

The zero page is not in the list: it needs the loader's results (setup header,
command line, initrd), so the VMM builds it with ``bootparams.build_zero_page``.
"""

from __future__ import annotations

from collections import namedtuple

from osvmm.arch.x86 import layout
from osvmm.boot.acpi import build_acpi
from osvmm.boot.mptable import build_mptable
from osvmm.machine import Machine

# regions: (guest-physical address, bytes) pairs to write; rsdp_addr: where the RSDP is.
BootTables = namedtuple("BootTables", "regions rsdp_addr")


def build_boot_tables(machine: Machine) -> BootTables:
    """The MP table at layout.MPTABLE_ADDR and the ACPI blob at layout.ACPI_TABLES_ADDR."""
    mptable = build_mptable(machine, layout.MPTABLE_ADDR)
    acpi = build_acpi(machine, layout.ACPI_TABLES_ADDR)
    assert layout.MPTABLE_ADDR + len(mptable) <= acpi.addr
    return BootTables([(layout.MPTABLE_ADDR, mptable), (acpi.addr, acpi.data)], acpi.rsdp_addr)
