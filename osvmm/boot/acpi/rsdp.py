"""RSDP (ACPI 2.0, 36 bytes) and XSDT: how the OS finds every other table.

The RSDP has no RSDT (RsdtAddress 0, as Firecracker and cloud-hypervisor):
an ACPI 2.0+ OS follows XsdtAddress. Both its checksums are set: the first
over bytes 0-19 (the ACPI 1.0 part), the extended one over all 36.
"""

from __future__ import annotations

import struct

from osvmm.boot.acpi.common import OEM_ID, checksum, table

RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2
RSDP_SIZE = 36
XSDT_REVISION = 1


def build_rsdp(xsdt_addr: int) -> bytes:
    data = bytearray(
        struct.pack(
            "<8sB6sBIIQB3x", RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0, RSDP_SIZE, xsdt_addr, 0
        )
    )
    assert len(data) == RSDP_SIZE
    data[8] = checksum(bytes(data[:20]))
    data[32] = checksum(bytes(data))
    return bytes(data)


def xsdt_size(count: int) -> int:
    return 36 + 8 * count


def build_xsdt(table_addrs: list[int]) -> bytes:
    return table(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in table_addrs))
