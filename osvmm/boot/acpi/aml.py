"""A minimal AML encoder: the few ACPI Machine Language terms the DSDT needs.

Encodings are those of ACPI 6.4 section 20.2 (AML grammar). Each function
returns the bytes of one term; nesting terms is concatenating bytes.
"""

from __future__ import annotations

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # "\"


def pkg_length(body_len: int) -> bytes:
    """The PkgLength encoding for a term whose contents after PkgLength are ``body_len`` bytes.

    The encoded length counts itself: one byte up to 63, otherwise a lead byte
    holding the count of following bytes (bits 7:6) and the low nibble.
    """
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            for i in range(extra):
                out.append((total >> (4 + 8 * i)) & 0xFF)
            return bytes(out)
    raise ValueError(f"AML package of {body_len} bytes is too long")


def name_seg(name: str) -> bytes:
    """A 4-character NameSeg, padded with "_" as ASL does."""
    if not 1 <= len(name) <= 4 or not (name[0].isupper() or name[0] == "_"):
        raise ValueError(f"bad AML name segment {name!r}")
    return name.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: an optional root prefix and one NameSeg (``\\_SB``, ``_S5``)."""
    if path.startswith("\\"):
        return bytes([ROOT_CHAR]) + name_seg(path[1:])
    return name_seg(path)


def integer(value: int) -> bytes:
    """The shortest integer encoding (ZeroOp, OneOp, Byte/Word/DWord/QWord constant)."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"AML integer {value:#x} does not fit in 64 bits")


def string(value: str) -> bytes:
    return bytes([STRING_PREFIX]) + value.encode("ascii") + b"\0"


def name(path: str, data: bytes) -> bytes:
    """Name (path, data)."""
    return bytes([NAME_OP]) + name_string(path) + data


def buffer(data: bytes) -> bytes:
    """Buffer () {data}: its size, then its bytes."""
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


# Resource descriptors (ACPI 6.4 section 6.4): what ResourceTemplate () holds.
def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Memory32Fixed (ReadWrite, base, length): large item 0x86, 9 bytes of data."""
    return (
        bytes([0x86, 9, 0, int(writable)])
        + base.to_bytes(4, "little")
        + length.to_bytes(4, "little")
    )


def interrupt(gsi: int, edge: bool = True, active_low: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive) {gsi}:
    the extended interrupt descriptor, large item 0x89, one interrupt."""
    flags = 0x01 | (0x02 if edge else 0) | (0x04 if active_low else 0)
    return bytes([0x89, 6, 0, flags, 1]) + gsi.to_bytes(4, "little")


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {descriptors}: a buffer ending in the end tag (checksum 0,
    which means "not checksummed")."""
    return buffer(b"".join(descriptors) + bytes([0x79, 0]))


def package(*elements: bytes) -> bytes:
    """Package () {elements}."""
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    """Scope (path) {terms}."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """Device (path) {terms}."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body
