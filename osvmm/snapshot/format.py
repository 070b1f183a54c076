"""The state file of a snapshot: a dict of states to bytes and back (pure).

Layout (little-endian), docs/snapshots.md:

    offset  size  field
    0       8     magic b"OSVMMSNP"
    8       4     format version (FORMAT_VERSION)
    12      4     header size (HEADER_SIZE)
    16      8     payload size in bytes
    24      32    SHA-256 of the payload
    56      8     reserved, zero
    64      ...   payload: the state, JSON in UTF-8

The state is a JSON object; a ``bytes`` value is written as
``{"$bytes": "<base64>"}`` and read back as ``bytes`` (the KVM structures are
kept as the kernel gives them). Anything else than a dict, list, str, int,
float, bool, None or bytes is a bug of the caller (TypeError).

``decode`` checks, in this order, and fails with a one-line SnapshotError:
the magic, the version, the header size, the length (a truncated or
extended file), the checksum, then the JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct

from osvmm.errors import SnapshotError

MAGIC = b"OSVMMSNP"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQ32s8x")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 64

_BYTES = "$bytes"


def _to_json(value):
    if isinstance(value, bytes | bytearray | memoryview):
        return {_BYTES: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"snapshot state keys are strings, not {key!r}")
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a snapshot state")


def _from_json(value):
    if isinstance(value, dict):
        if len(value) == 1 and _BYTES in value:
            return base64.b64decode(value[_BYTES], validate=True)
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def encode(state: dict) -> bytes:
    """The state file's bytes for ``state``."""
    payload = json.dumps(_to_json(state), separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(payload).digest()
    return HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, len(payload), digest) + payload


def decode(data: bytes, what: str = "snapshot state") -> dict:
    """The state in ``data`` (a state file's bytes), checked; ``what`` names it in errors."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{what}: not an osvmm snapshot (no {MAGIC.decode()} magic)")
    if len(data) < HEADER_SIZE:
        raise SnapshotError(f"{what}: truncated ({len(data)} bytes, the header alone is 64)")
    magic, version, header_size, size, digest = HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"{what}: format version {version}; this osvmm reads version {FORMAT_VERSION}"
        )
    if header_size != HEADER_SIZE:
        raise SnapshotError(f"{what}: header size {header_size}, expected {HEADER_SIZE}")
    if len(data) != HEADER_SIZE + size:
        kind = "truncated" if len(data) < HEADER_SIZE + size else "wrong size"
        raise SnapshotError(
            f"{what}: {kind} ({len(data)} bytes, the header says {HEADER_SIZE + size})"
        )
    payload = data[HEADER_SIZE:]
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{what}: checksum mismatch (the file is corrupted)")
    try:
        state = _from_json(json.loads(payload))
    except ValueError as err:  # json and base64 errors alike: a checksummed file we did not write
        raise SnapshotError(f"{what}: unreadable state ({err})") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{what}: the state is not an object")
    return state
