"""The state file of a snapshot: a dict of states to bytes and back (pure).

Layout (little-endian), docs/snapshots.md:

    offset  size  field
    0       8     magic b"OSVMMSNP"
    8       4     format version (``version_for``: 1, or 2 with virtio devices)
    12      4     header size (HEADER_SIZE)
    16      8     payload size in bytes
    24      32    SHA-256 of the payload
    56      8     reserved, zero
    64      ...   payload: the state, JSON in UTF-8

The state is a JSON object; a ``bytes`` value is written as
``{"$bytes": "<base64>"}`` and read back as ``bytes`` (the KVM structures are
kept as the kernel gives them). Anything else than a dict, list, str, int,
float, bool, None or bytes is a bug of the caller (TypeError).

Versions: 1 is a partition without virtio devices; 2 adds the ``virtio`` key
(each device's transport, queues and backend identity) and ``machine``'s
``virtio_mmio``. A state without virtio devices is still written as version 1,
so an older osvmm resumes it; one with them is version 2, which an osvmm that
reads only version 1 refuses (it would resume the partition without its disks).
This osvmm reads both (``READ_VERSIONS``).

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
FORMAT_VERSION = 2  # the newest this osvmm writes
READ_VERSIONS = (1, 2)
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


def _from_json(obj: dict):
    """json.loads's object_hook: each object as parsed, innermost first."""
    if len(obj) == 1 and _BYTES in obj:
        return base64.b64decode(obj[_BYTES], validate=True)
    return obj


def version_for(state: dict) -> int:
    """The lowest version that holds ``state``: 2 with virtio devices, else 1."""
    return 2 if state.get("virtio") else 1


def encode(state: dict) -> bytes:
    """The state file's bytes for ``state``."""
    payload = json.dumps(_to_json(state), separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(payload).digest()
    version = version_for(state)
    return HEADER.pack(MAGIC, version, HEADER_SIZE, len(payload), digest) + payload


def decode(data: bytes, what: str = "snapshot state") -> dict:
    """The state in ``data`` (a state file's bytes), checked; ``what`` names it in errors."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{what}: not an osvmm snapshot (no {MAGIC.decode()} magic)")
    if len(data) < HEADER_SIZE:
        raise SnapshotError(f"{what}: truncated ({len(data)} bytes, the header alone is 64)")
    magic, version, header_size, size, digest = HEADER.unpack_from(data)
    if version not in READ_VERSIONS:
        raise SnapshotError(
            f"{what}: format version {version}; this osvmm reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}"
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
        state = json.loads(payload, object_hook=_from_json)
    except ValueError as err:  # json and base64 errors alike: a checksummed file we did not write
        raise SnapshotError(f"{what}: unreadable state ({err})") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{what}: the state is not an object")
    return state
