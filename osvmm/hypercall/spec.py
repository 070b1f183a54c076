"""docs/hypercalls.md as an executable specification, written from the document alone.

The model checker (``checker.check``) compares every transition it explores
with what this module says the document prescribes: the result (the first
applicable error in the order of the call's error table, or the success
value), the effects in order, and the state after (lifecycle, attachments).
The invariants alone let a monitor return another documented error than the
first applicable one, accept a value the document rejects, or allow a
lifecycle transition the ops table forbids; the comparison does not.

Nothing here comes from ``monitor.py``: the constants are the document's,
restated (tests/test_hypercall_spec.py checks them against ``abi`` and the
layout), the rows of each error table carry the document's "when" text word
for word (the same test reads the tables from the document and compares
them, rows in order), and the configuration is read from the plan-level
``MonitorConfig`` (names, RAM ranges, vCPUs, grants, channel sizes and
members), numbered and laid out here as the document's Concepts say.

``Spec(config).outcome(lifecycle, attachments, caller, nr, args)`` returns an
``Outcome``; effects are tuples ``(kind, fields...)`` named as in the
document's "For the VMM" table (ConsoleWrite without its data, which depends
on the VMM's memory).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# -- the document's constants ------------------------------------------------------------

U64_MAX = (1 << 64) - 1
NUM_ARGS = 4  # RDI, RSI, RBX, RCX
EPERM, ENOENT, ESRCH, EFAULT, EBUSY, EINVAL, ENOSPC, ENOSYS = 1, 2, 3, 14, 16, 22, 28, 38
ERRNO = {
    "EPERM": EPERM,
    "ENOENT": ENOENT,
    "ESRCH": ESRCH,
    "EFAULT": EFAULT,
    "EBUSY": EBUSY,
    "EINVAL": EINVAL,
    "ENOSPC": ENOSPC,
    "ENOSYS": ENOSYS,
}
PARTITION_INFO, CONSOLE_WRITE, DOORBELL, CHANNEL_ATTACH, CHANNEL_DETACH, PARTITION_CONTROL = range(
    6
)
CALL_NAMES = (
    "PARTITION_INFO",
    "CONSOLE_WRITE",
    "DOORBELL",
    "CHANNEL_ATTACH",
    "CHANNEL_DETACH",
    "PARTITION_CONTROL",
)
INFO_ALIGN = 8
INFO_HEADER_SIZE = 40
INFO_ENTRY_SIZE = 24
ABI_VERSION = 1
CONSOLE_WRITE_MAX = 4096
VECTOR_MIN, VECTOR_MAX = 32, 255
ATTACH_READONLY = 1
CHANNEL_WINDOW_START = 0xD000_0000
RUNNING, STOPPED = "running", "stopped"


# -- the partition and channel facts the document's Concepts define --------------------------


class _Config:
    """Partitions and channels numbered in plan order; channel slots packed in id order."""

    def __init__(self, config) -> None:
        parts = list(config.partitions)
        ids = {p.name: i for i, p in enumerate(parts)}
        self.names = tuple(p.name for p in parts)
        self.ram = tuple(tuple((int(s), int(n)) for s, n in p.ram) for p in parts)
        self.vcpus = tuple(p.vcpus for p in parts)
        self.privileged = tuple(bool(p.privileged) for p in parts)
        # rings[i]: the partitions i may ring; a partition may always ring itself.
        self.rings = tuple(
            frozenset({ids[d] for d in p.doorbells} | {i}) for i, p in enumerate(parts)
        )
        chans = list(config.channels)
        self.channel_size = tuple(c.size for c in chans)
        # slot(i) = CHANNEL_WINDOW_START + size(0) + ... + size(i-1)
        self.slot = tuple(
            CHANNEL_WINDOW_START + sum(self.channel_size[:i]) for i in range(len(chans))
        )
        # members[c]: partition id -> True for "rw", False for "ro"
        self.members = tuple({ids[m]: mode == "rw" for m, mode in c.members.items()} for c in chans)

    def inside_ram(self, partition: int, a: int, n: int) -> bool:
        """[a, a + n) inside one RAM range of the partition (docs: Calling convention)."""
        return any(s <= a and a + n <= s + size for s, size in self.ram[partition])

    def member_channels(self, partition: int) -> list[int]:
        return [c for c, members in enumerate(self.members) if partition in members]


# -- one call as the tables see it -----------------------------------------------------------


class Call:
    """A call in a state: what the "when" column of a table is a predicate over."""

    __slots__ = ("cfg", "lifecycle", "attachments", "caller", "nr", "a")

    def __init__(self, cfg, lifecycle, attachments, caller, nr, a) -> None:
        self.cfg: _Config = cfg
        self.lifecycle: tuple[str, ...] = lifecycle
        self.attachments: frozenset[tuple[int, int, bool]] = attachments  # (p, ch, writable)
        self.caller: int = caller
        self.nr: int = nr
        self.a: tuple[int, ...] = a

    def attached(self, partition: int, channel: int) -> bool:
        return any(p == partition and c == channel for p, c, _ in self.attachments)


@dataclass(frozen=True)
class Row:
    """One row of an error table: the error, the document's "when" text, its predicate."""

    errno: int
    when: str
    applies: Callable[[Call], bool]


@dataclass(frozen=True)
class Op:
    """One row of PARTITION_CONTROL's ops table, with what its columns say."""

    nr: int
    name: str
    target: str  # the document's "target" column
    effect: str  # the document's "effect" column
    on_self: bool  # the target is the caller itself (else another partition)
    target_must_be: str | None  # the target's lifecycle the op needs (None: either)
    after: str  # the target's lifecycle after the op (the effect column)


OPS: tuple[Op, ...] = (
    Op(
        0,
        "SHUTDOWN",
        "the caller itself",
        "power off: the partition is stopped",
        True,
        None,
        STOPPED,
    ),
    Op(
        1,
        "REBOOT",
        "the caller itself",
        "reset and boot the partition's kernel again",
        True,
        None,
        RUNNING,
    ),
    Op(
        2,
        "STOP",
        "another, running partition; privileged caller",
        "power it off",
        False,
        RUNNING,
        STOPPED,
    ),
    Op(
        3,
        "START",
        "another, stopped partition; privileged caller",
        "boot it",
        False,
        STOPPED,
        RUNNING,
    ),
    Op(
        4,
        "RESTART",
        "another partition (running or stopped); privileged caller",
        "power it off if running, then boot it",
        False,
        None,
        RUNNING,
    ),
)
_OP = {op.nr: op for op in OPS}


def _info_len(c: Call) -> int:
    return INFO_HEADER_SIZE + INFO_ENTRY_SIZE * len(c.cfg.member_channels(c.caller))


def _op_misdirected(c: Call) -> bool:
    op = _OP.get(c.a[1])
    return op is None or op.on_self != (c.a[0] == c.caller)


def _busy(c: Call) -> bool:
    op = _OP[c.a[1]]
    return op.target_must_be is not None and c.lifecycle[c.a[0]] != op.target_must_be


DISPATCH_ERRORS: tuple[Row, ...] = (
    Row(
        ESRCH,
        "the caller is not a running partition (internal: a stopped partition runs no code, "
        "so no guest sees this)",
        lambda c: c.lifecycle[c.caller] != RUNNING,
    ),
    Row(ENOSYS, "EAX is not the number of one of the six calls", lambda c: c.nr not in range(6)),
)

ERRORS: dict[int, tuple[Row, ...]] = {
    PARTITION_INFO: (
        Row(EINVAL, "buf_gpa is not a multiple of 8", lambda c: c.a[0] % INFO_ALIGN != 0),
        Row(
            EFAULT,
            "[buf_gpa, buf_gpa + buf_len) is not inside one RAM range of the caller",
            lambda c: not c.cfg.inside_ram(c.caller, c.a[0], c.a[1]),
        ),
        Row(
            ENOSPC,
            "buf_len is smaller than the structure (nothing is written)",
            lambda c: c.a[1] < _info_len(c),
        ),
    ),
    CONSOLE_WRITE: (
        Row(EINVAL, "len > 4096", lambda c: c.a[1] > CONSOLE_WRITE_MAX),
        Row(
            EFAULT,
            "[gpa, gpa + len) is not inside one RAM range of the caller (or the VMM could not "
            "read it)",
            lambda c: not c.cfg.inside_ram(c.caller, c.a[0], c.a[1]),
        ),
    ),
    DOORBELL: (
        Row(
            ENOENT, "no partition has id target_partition_id", lambda c: c.a[0] >= len(c.cfg.names)
        ),
        Row(
            EPERM,
            "the target is another partition and the caller has no doorbell to it",
            lambda c: c.a[0] not in c.cfg.rings[c.caller],
        ),
        Row(
            EINVAL,
            "vector is not in 32..255 (0..31 are the CPU's exceptions)",
            lambda c: not VECTOR_MIN <= c.a[2] <= VECTOR_MAX,
        ),
        Row(
            EINVAL,
            "vcpu_index is not below the target's vCPU count",
            lambda c: c.a[1] >= c.cfg.vcpus[c.a[0]],
        ),
        Row(EBUSY, "the target is stopped", lambda c: c.lifecycle[c.a[0]] != RUNNING),
    ),
    CHANNEL_ATTACH: (
        Row(ENOENT, "no channel has id channel_id", lambda c: c.a[0] >= len(c.cfg.slot)),
        Row(
            EPERM,
            "the caller is not a member of the channel",
            lambda c: c.caller not in c.cfg.members[c.a[0]],
        ),
        Row(
            EINVAL,
            "flags has a bit other than ATTACH_READONLY",
            lambda c: c.a[1] & ~ATTACH_READONLY != 0,
        ),
        Row(
            EBUSY,
            "the caller has the channel attached already",
            lambda c: c.attached(c.caller, c.a[0]),
        ),
    ),
    CHANNEL_DETACH: (
        Row(ENOENT, "no channel has id channel_id", lambda c: c.a[0] >= len(c.cfg.slot)),
        Row(
            EINVAL,
            "the caller does not have the channel attached",
            lambda c: not c.attached(c.caller, c.a[0]),
        ),
    ),
    PARTITION_CONTROL: (
        Row(
            ENOENT, "no partition has id target_partition_id", lambda c: c.a[0] >= len(c.cfg.names)
        ),
        Row(
            EINVAL,
            "op is not 0..4, or is STOP/START/RESTART on the caller itself, or SHUTDOWN/REBOOT "
            "on another partition",
            _op_misdirected,
        ),
        Row(
            EPERM,
            "the target is another partition and the caller is not privileged",
            lambda c: c.a[0] != c.caller and not c.cfg.privileged[c.caller],
        ),
        Row(EBUSY, "STOP of a stopped partition, START of a running one", _busy),
    ),
}


# -- outcomes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the document prescribes for one call."""

    result: int
    effects: tuple[tuple, ...]
    lifecycle: tuple[str, ...]
    attachments: frozenset[tuple[int, int, bool]]
    row: Row | None = None  # the error row that decided it; None for a success

    @property
    def why(self) -> str:
        if self.row is None:
            return "success"
        return f"-{_name(self.row.errno)}: {self.row.when}"


def info_structure(cfg: _Config, attachments, partition: int) -> bytes:
    """PARTITION_INFO's structure, field by field from the document's two tables."""
    mine = cfg.member_channels(partition)
    mask = 0
    for target in cfg.rings[partition]:
        mask |= 1 << target
    out = struct.pack("<I", ABI_VERSION)  # 0 abi_version
    out += struct.pack("<I", INFO_HEADER_SIZE + INFO_ENTRY_SIZE * len(mine))  # 4 length
    out += struct.pack("<I", partition)  # 8 partition_id
    out += struct.pack("<I", cfg.vcpus[partition])  # 12 vcpu_count
    out += struct.pack("<Q", sum(size for _, size in cfg.ram[partition]))  # 16 memory_size
    out += struct.pack("<I", 1 if cfg.privileged[partition] else 0)  # 24 flags
    out += struct.pack("<I", len(mine))  # 28 channel_count
    out += struct.pack("<Q", mask)  # 32 doorbell_mask
    held = {c for p, c, _ in attachments if p == partition}
    for c in mine:
        flags = (1 if cfg.members[c][partition] else 0) | (2 if c in held else 0)
        out += struct.pack("<IIQQ", c, flags, cfg.slot[c], cfg.channel_size[c])
    return out


class Spec:
    """The document's prescription for a configuration (a ``MonitorConfig``)."""

    def __init__(self, config) -> None:
        self.cfg = _Config(config)

    def outcome(
        self,
        lifecycle: tuple[str, ...],
        attachments: frozenset[tuple[int, int, bool]],
        caller: int,
        nr: int,
        args: Sequence[int],
    ) -> Outcome | None:
        """What the call must do; None for arguments no register could hold (outside the
        document: the invariants still ask that such a call fails and changes nothing)."""
        if len(args) > NUM_ARGS or not all(type(a) is int for a in args):
            return None
        if args and not 0 <= min(args) <= max(args) <= U64_MAX:
            return None
        if type(nr) is not int or not 0 <= caller < len(self.cfg.names):
            return None
        a = tuple(args) + (0,) * (NUM_ARGS - len(args))
        if type(attachments) is not frozenset:
            attachments = frozenset(attachments)
        call = Call(self.cfg, tuple(lifecycle), attachments, caller, nr, a)
        for rows in (DISPATCH_ERRORS, ERRORS.get(nr, ())):
            for row in rows:
                if row.applies(call):
                    return Outcome(-row.errno, (), call.lifecycle, call.attachments, row)
        return _SUCCESS[nr](call)


def _name(errno: int) -> str:
    return next(name for name, value in ERRNO.items() if value == errno)


def _ok(c: Call, result: int, effects=(), lifecycle=None, attachments=None) -> Outcome:
    return Outcome(
        result,
        tuple(effects),
        c.lifecycle if lifecycle is None else lifecycle,
        c.attachments if attachments is None else attachments,
    )


def _partition_info(c: Call) -> Outcome:
    data = info_structure(c.cfg, c.attachments, c.caller)
    return _ok(c, len(data), [("WriteGuest", c.caller, c.a[0], data)])


def _console_write(c: Call) -> Outcome:
    gpa, length = c.a[0], c.a[1]
    if length == 0:
        return _ok(c, 0)
    return _ok(c, length, [("ConsoleWrite", c.caller, gpa, length)])


def _doorbell(c: Call) -> Outcome:
    return _ok(c, 0, [("RaiseInterrupt", c.a[0], c.a[1], c.a[2])])


def _channel_attach(c: Call) -> Outcome:
    ch, flags = c.a[0], c.a[1]
    writable = c.cfg.members[ch][c.caller] and not flags & ATTACH_READONLY
    slot, size = c.cfg.slot[ch], c.cfg.channel_size[ch]
    return _ok(
        c,
        slot,
        [("MapChannel", c.caller, ch, slot, size, writable)],
        attachments=c.attachments | {(c.caller, ch, writable)},
    )


def _channel_detach(c: Call) -> Outcome:
    ch = c.a[0]
    held = {att for att in c.attachments if att[0] == c.caller and att[1] == ch}
    return _ok(
        c,
        0,
        [("UnmapChannel", c.caller, ch, c.cfg.slot[ch], c.cfg.channel_size[ch])],
        attachments=c.attachments - held,
    )


def _partition_control(c: Call) -> Outcome:
    target, op = c.a[0], _OP[c.a[1]]
    released = sorted(att for att in c.attachments if att[0] == target)
    effects = [
        ("UnmapChannel", target, ch, c.cfg.slot[ch], c.cfg.channel_size[ch])
        for _, ch, _ in released
    ]
    effects.append(("PartitionLifecycle", target, op.nr))
    lifecycle = list(c.lifecycle)
    lifecycle[target] = op.after
    return _ok(c, 0, effects, tuple(lifecycle), c.attachments - frozenset(released))


_SUCCESS: dict[int, Callable[[Call], Outcome]] = {
    PARTITION_INFO: _partition_info,
    CONSOLE_WRITE: _console_write,
    DOORBELL: _doorbell,
    CHANNEL_ATTACH: _channel_attach,
    CHANNEL_DETACH: _channel_detach,
    PARTITION_CONTROL: _partition_control,
}
