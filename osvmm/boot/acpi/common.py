"""What every ACPI table shares: the 36-byte header, checksums, Generic Address Structures.

Field names and layouts are those of the ACPI 6.4 specification, section 5.2.
"""

from __future__ import annotations

import struct

OEM_ID = b"OSVMM "  # 6 bytes
OEM_REVISION = 1
CREATOR_ID = b"OSVM"  # the "compiler" that made the tables: this package
CREATOR_REVISION = 1

HEADER_FORMAT = "<4sIBB6s8sI4sI"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)
assert HEADER_SIZE == 36

# Generic Address Structure (ACPI 6.4 section 5.2.3.2).
GAS_FORMAT = "<BBBBQ"
GAS_SIZE = struct.calcsize(GAS_FORMAT)
assert GAS_SIZE == 12
ADDRESS_SPACE_SYSTEM_MEMORY = 0
ADDRESS_SPACE_SYSTEM_IO = 1
ACCESS_BYTE = 1
ACCESS_WORD = 2
ACCESS_DWORD = 3


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to zero mod 256."""
    return -sum(data) & 0xFF


def oem_table_id(signature: bytes) -> bytes:
    """The 8-byte OEM table ID: "OSVM" followed by the table signature ("OSVMAPIC")."""
    return (b"OSVM" + signature).ljust(8, b" ")[:8]


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A whole ACPI table: the standard header (checksum filled in) followed by ``body``."""
    assert len(signature) == 4
    header = struct.pack(
        HEADER_FORMAT,
        signature,
        HEADER_SIZE + len(body),
        revision,
        0,
        OEM_ID,
        oem_table_id(signature),
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    data = bytearray(header + body)
    data[9] = checksum(bytes(data))
    return bytes(data)


def gas(
    space_id: int, bit_width: int, address: int, access_size: int, bit_offset: int = 0
) -> bytes:
    """A Generic Address Structure."""
    return struct.pack(GAS_FORMAT, space_id, bit_width, bit_offset, access_size, address)


NULL_GAS = bytes(GAS_SIZE)
