"""A replay of what the wmkernel guest writes (osvmm/guests/src/wmkernel.c; its
protection is osvmm/guests/wmkernel.py): the legitimate writes and the
driver's seeded wild writes from the same splitmix64 stream, so a test can
tell, word by word and independently of the VMM, what must be caught."""

from __future__ import annotations

import struct
from collections import Counter

from osvmm.guests.wmkernel import (  # noqa: F401  (re-exported for the tests)
    BOUNDARIES,
    DRIVER_GRANTS,
    KERNEL_GRANTS,
    PROTECTED,
    WIN_END,
    WIN_START,
    protect_spec,
    protect_table,
    protect_toml,
)


def _inside(b: int, spans) -> bool:
    return any(s <= b < e for s, e in spans)


def caught_by_driver(b: int) -> bool:
    """Whether a driver write to byte ``b`` must be caught (its word protected, not granted)."""
    return _inside(b, PROTECTED) and not _inside(b, DRIVER_GRANTS)


# -- the writes ----------------------------------------------------------------------------


def legit_writes() -> list[tuple[int, bytes]]:
    """The legitimate phase, in the guest's order: (address, bytes)."""
    out = [(a, struct.pack("<I", 0x4B000000 ^ a)) for a in range(0x400200, 0x400400, 4)]
    out.append((0x402100, struct.pack("<I", 0x4B402100) * 0x40))
    out.append((0x4021F8, struct.pack("<Q", 0x4B4021FC4B4021F8)))
    out += [(0x400800, struct.pack("<I", 0x11223344)), (0x402FFC, struct.pack("<I", 0x55667788))]
    out.append((0x403000, struct.pack("<I", 0x99AABBCC)))
    out += [(a, struct.pack("<I", 0xD0000000 ^ a)) for a in range(0x400100, 0x400110, 4)]
    out.append((0x401FF8, struct.pack("<Q", 0xD0000000D0401FF8)))
    out.append((0x401FFC, struct.pack("<Q", 0xD0402000D0401FFC)))
    out.append((0x402004, struct.pack("<I", 0xD0402004)))
    return out


class SplitMix64:
    M = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = seed

    def __call__(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.M
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.M
        return z ^ (z >> 31)


def wild_writes(seed: int, count: int) -> list[tuple[int, bytes]]:
    """The driver's wild writes, as wmkernel.c's driver_wild makes them."""
    rnd = SplitMix64(seed)
    srcbuf = b"".join(struct.pack("<Q", rnd()) for _ in range(8))
    out = []
    for _ in range(count):
        kind = rnd() % 8
        addr = WIN_START + rnd() % (WIN_END - WIN_START)
        value = rnd()
        if kind <= 3:
            size = 1 << kind
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        elif kind == 4:
            data = bytes([value & 0xFF]) * (1 + rnd() % 16)
        elif kind == 5:
            data = struct.pack("<I", value & 0xFFFFFFFF) * (1 + rnd() % 8)
        elif kind == 6:
            n = 1 + rnd() % 16
            off = rnd() % 32
            data = srcbuf[off : off + n]
        else:
            addr = BOUNDARIES[rnd() % len(BOUNDARIES)] - (1 + rnd() % 7)
            data = struct.pack("<Q", value)
        if kind != 7:
            addr = min(addr, WIN_END - len(data))
        out.append((addr, data))
    return out


def expected_caught(writes) -> Counter:
    """(byte address, attempted value) of every driver byte that must be caught."""
    return Counter(
        (a + i, v) for a, data in writes for i, v in enumerate(data) if caught_by_driver(a + i)
    )


def recorded(violations) -> Counter:
    return Counter((v.gpa + i, b) for v in violations for i, b in enumerate(v.attempted))


def model_window(writes_applied) -> bytes:
    """The window's bytes after the given (address, bytes) writes onto zeroed memory."""
    mem = bytearray(WIN_END - WIN_START)
    for a, data in writes_applied:
        mem[a - WIN_START : a - WIN_START + len(data)] = data
    return bytes(mem)


def without_caught(writes) -> list[tuple[int, bytes]]:
    """The driver's writes as ``deny`` applies them: every caught byte dropped."""
    out = []
    for a, data in writes:
        for i, v in enumerate(data):
            if not caught_by_driver(a + i):
                out.append((a + i, bytes([v])))
    return out
