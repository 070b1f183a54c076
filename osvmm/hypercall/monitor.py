"""The hypercall monitor as a pure state machine: no KVM, no I/O.

``step(state, caller_id, call_nr, args)`` is the whole partition <-> VMM
interface. It returns a new ``MonitorState``, the result for the caller's RAX,
and a tuple of effects (plain dataclasses) that the live VMM applies: map or
unmap a channel, raise an interrupt, write to the console or to guest memory,
stop or boot a partition. The same function runs under the model checker
(``osvmm.hypercall.checker``), so what the checker proves is what the VMM runs.

State, built once from a ``MonitorConfig`` by ``MonitorState.from_config``:

    topology     static: partitions (id, name, RAM ranges: each partition's
                 Machine.ram_ranges, the same the memslots map; vCPUs, privileged,
                 doorbell grants) and channels (id, name, size, slot, members)
    lifecycle    per partition: "running" or "stopped"
    attachments  which partition has which channel mapped, writable or not

Partition and channel ids are their positions in the plan. Channel slots are
packed in id order from CHANNEL_WINDOW_START (docs/hypercalls.md).

``step`` never raises: every argument is an arbitrary unsigned 64-bit value,
and anything it does not accept is a negative errno.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from osvmm.arch.x86 import layout
from osvmm.arch.x86.layout import PAGE_SIZE
from osvmm.errors import ConfigError
from osvmm.hypercall import abi
from osvmm.hypercall.abi import (
    EBUSY,
    EFAULT,
    EINVAL,
    ENOENT,
    ENOSPC,
    ENOSYS,
    EPERM,
    ESRCH,
    ControlOp,
)

U64_MAX = abi.U64_MAX
_NUM_ARGS = abi.NUM_ARGS

RUNNING = "running"
STOPPED = "stopped"

_CONTROL_OPS = frozenset(int(op) for op in ControlOp)

# (partition id, guest-physical address, length) -> the bytes there.
MemoryReader = Callable[[int, int, int], bytes]


# ---------------------------------------------------------------------------
# Configuration: what the lead builds from the plan file.


@dataclass(frozen=True)
class PartitionConfig:
    name: str
    ram: Sequence[tuple[int, int]]  # (gpa, size): the partition's Machine.ram_ranges
    vcpus: int = 1
    privileged: bool = False
    doorbells: Sequence[str] = ()  # names of partitions this one may ring


@dataclass(frozen=True)
class ChannelConfig:
    name: str
    size: int  # bytes, a multiple of 4 KiB
    members: Mapping[str, str] = field(default_factory=dict)  # partition name -> "rw" | "ro"


@dataclass(frozen=True)
class MonitorConfig:
    partitions: Sequence[PartitionConfig]
    channels: Sequence[ChannelConfig] = ()


# ---------------------------------------------------------------------------
# State.


@dataclass(frozen=True, eq=False)
class Partition:
    id: int
    name: str
    ram: tuple[tuple[int, int], ...]  # (gpa, size) ranges
    vcpus: int
    privileged: bool
    doorbells: frozenset[int]  # ids it may ring besides itself

    @property
    def memory(self) -> int:
        return sum(size for _, size in self.ram)

    def ram_contains(self, gpa: int, length: int) -> bool:
        """Whether [gpa, gpa + length) lies inside one RAM range."""
        for start, size in self.ram:
            if start <= gpa and gpa + length <= start + size:
                return True
        return False

    def may_ring(self, target: int) -> bool:
        return target == self.id or target in self.doorbells


@dataclass(frozen=True, eq=False)
class Channel:
    id: int
    name: str
    size: int
    gpa: int  # its slot in the channel window, the same in every member
    members: Mapping[int, bool]  # partition id -> writable ("rw")


@dataclass(frozen=True, eq=False)
class Topology:
    """The static part of the state (compared by identity)."""

    partitions: tuple[Partition, ...]
    channels: tuple[Channel, ...]


@dataclass(frozen=True, order=True)
class Attachment:
    partition: int
    channel: int
    writable: bool


@dataclass(frozen=True)
class MonitorState:
    topology: Topology = field(repr=False)
    lifecycle: tuple[str, ...]
    attachments: frozenset[Attachment] = frozenset()

    @classmethod
    def from_config(cls, config: MonitorConfig) -> MonitorState:
        topology = build_topology(config)
        return cls(topology, (RUNNING,) * len(topology.partitions))

    def attachment(self, partition: int, channel: int) -> Attachment | None:
        for a in self.attachments:
            if a.partition == partition and a.channel == channel:
                return a
        return None

    def attached(self, partition: int) -> tuple[Attachment, ...]:
        """The partition's attachments, in channel order."""
        return tuple(sorted(a for a in self.attachments if a.partition == partition))


def channel_slots(sizes: Sequence[int]) -> list[int]:
    """Guest-physical slot of each channel: packed in id order from the window's start."""
    slots, gpa = [], layout.CHANNEL_WINDOW_START
    for size in sizes:
        slots.append(gpa)
        gpa += size
    return slots


def build_topology(config: MonitorConfig) -> Topology:
    """Validate a config and number its partitions and channels (plan order)."""
    parts = list(config.partitions)
    if not parts:
        raise ConfigError("the plan has no partitions")
    if len(parts) > abi.MAX_PARTITIONS:
        raise ConfigError(f"{len(parts)} partitions: at most {abi.MAX_PARTITIONS}")
    ids: dict[str, int] = {}
    for i, p in enumerate(parts):
        if not p.name or p.name in ids:
            raise ConfigError(f"partition name {p.name!r} is empty or used twice")
        ids[p.name] = i
    if sum(1 for p in parts if p.privileged) > 1:
        raise ConfigError("more than one partition is privileged")
    partitions = []
    for i, p in enumerate(parts):
        ram = tuple((int(start), int(size)) for start, size in p.ram)
        if not ram or any(
            start < 0 or size <= 0 or start % PAGE_SIZE or size % PAGE_SIZE for start, size in ram
        ):
            raise ConfigError(f"partition {p.name}: RAM ranges {ram} are empty or not page aligned")
        if not 1 <= p.vcpus <= 255:
            raise ConfigError(f"partition {p.name}: {p.vcpus} vCPUs (1..255)")
        rings = set()
        for name in p.doorbells:
            if name not in ids:
                raise ConfigError(f"partition {p.name}: doorbell to unknown partition {name!r}")
            rings.add(ids[name])
        partitions.append(Partition(i, p.name, ram, p.vcpus, p.privileged, frozenset(rings)))

    chans = list(config.channels)
    if len(chans) > abi.MAX_CHANNELS:
        raise ConfigError(f"{len(chans)} channels: at most {abi.MAX_CHANNELS}")
    names: set[str] = set()
    for c in chans:
        if not c.name or c.name in names:
            raise ConfigError(f"channel name {c.name!r} is empty or used twice")
        names.add(c.name)
        if c.size <= 0 or c.size % PAGE_SIZE:
            raise ConfigError(f"channel {c.name}: size {c.size:#x} is not a multiple of 4 KiB")
        if not c.members:
            raise ConfigError(f"channel {c.name}: no members")
        for member, perm in c.members.items():
            if member not in ids:
                raise ConfigError(f"channel {c.name}: unknown member {member!r}")
            if perm not in ("rw", "ro"):
                raise ConfigError(f"channel {c.name}: member {member}: {perm!r} is not rw or ro")
    if sum(c.size for c in chans) > layout.CHANNEL_WINDOW_SIZE:
        raise ConfigError(
            f"channels need {sum(c.size for c in chans):#x} bytes; "
            f"the channel window has {layout.CHANNEL_WINDOW_SIZE:#x}"
        )
    slots = channel_slots([c.size for c in chans])
    channels = tuple(
        Channel(
            i, c.name, c.size, slots[i], {ids[m]: perm == "rw" for m, perm in c.members.items()}
        )
        for i, c in enumerate(chans)
    )
    return Topology(tuple(partitions), channels)


# ---------------------------------------------------------------------------
# The topology of a running VMM: grown by ``osvmm create``, cut by ``osvmm destroy``.
# Ids are positions and are never reused: a partition or channel added at run time
# takes the next one, and one removed keeps its id, withdrawn (no grants, no members).


def extend_topology(
    topology: Topology,
    partitions: Sequence[PartitionConfig],
    channels: Sequence[ChannelConfig],
    ids: Mapping[str, int],
    grants: Sequence[tuple[str, str]] = (),
) -> Topology:
    """``topology`` with ``partitions`` (ids len(topology.partitions), ... in order) and
    ``channels`` (the next channel ids, their slots after every slot taken, a withdrawn
    channel's included) added. ``ids``: name -> id of the partitions that run; the new
    ones' names are added to it. ``grants``: (ringer, target) pairs, a partition that
    runs given the right to ring another (a grant only adds: nothing it holds changes).
    Existing ids and slots are unchanged, so a running partition's attachments stay
    valid. ConfigError when it does not fit."""
    names = dict(ids)
    first = len(topology.partitions)
    for k, p in enumerate(partitions):
        if p.name in names:
            raise ConfigError(f"partition {p.name!r} exists already")
        names[p.name] = first + k
    count = first + len(partitions)
    if count > abi.MAX_PARTITIONS:
        raise ConfigError(
            f"hypercall ids: this VMM has numbered {first} partitions; {len(partitions)} more "
            f"would pass the ABI's {abi.MAX_PARTITIONS} (ids are not reused: a new osvmm up "
            "numbers them afresh)"
        )
    added = []
    for k, p in enumerate(partitions):
        ram = tuple((int(start), int(size)) for start, size in p.ram)
        if not ram or any(
            start % PAGE_SIZE or size % PAGE_SIZE or size <= 0 for start, size in ram
        ):
            raise ConfigError(f"partition {p.name}: RAM ranges {ram} are empty or not page aligned")
        if not 1 <= p.vcpus <= 255:
            raise ConfigError(f"partition {p.name}: {p.vcpus} vCPUs (1..255)")
        if p.privileged:
            raise ConfigError(
                f"partition {p.name}: a partition added at run time is not privileged"
            )
        rings = set()
        for target in p.doorbells:
            if target not in names:
                raise ConfigError(f"partition {p.name}: doorbell to unknown partition {target!r}")
            rings.add(names[target])
        rings.discard(first + k)
        added.append(Partition(first + k, p.name, ram, p.vcpus, False, frozenset(rings)))
    taken = {c.name for c in topology.channels if c.members}
    total = len(topology.channels) + len(channels)
    if total > abi.MAX_CHANNELS:
        raise ConfigError(
            f"channel ids: this VMM has numbered {len(topology.channels)} channels; "
            f"{len(channels)} more would pass {abi.MAX_CHANNELS} (ids are not reused)"
        )
    used = sum(c.size for c in topology.channels)
    sizes = [c.size for c in channels]
    if used + sum(sizes) > layout.CHANNEL_WINDOW_SIZE:
        raise ConfigError(
            f"channels: {used + sum(sizes):#x} bytes of slots (withdrawn channels' included) "
            f"do not fit the {layout.CHANNEL_WINDOW_SIZE:#x}-byte channel window"
        )
    gpa = layout.CHANNEL_WINDOW_START + used
    new_channels = []
    for k, c in enumerate(channels):
        if c.name in taken:
            raise ConfigError(f"channel {c.name!r} exists already")
        taken.add(c.name)
        if c.size <= 0 or c.size % PAGE_SIZE:
            raise ConfigError(f"channel {c.name}: size {c.size:#x} is not a multiple of 4 KiB")
        members = {}
        for member, perm in c.members.items():
            if member not in names:
                raise ConfigError(f"channel {c.name}: unknown member {member!r}")
            if perm not in ("rw", "ro"):
                raise ConfigError(f"channel {c.name}: member {member}: {perm!r} is not rw or ro")
            members[names[member]] = perm == "rw"
        if not members:
            raise ConfigError(f"channel {c.name}: no members")
        new_channels.append(Channel(len(topology.channels) + k, c.name, c.size, gpa, members))
        gpa += c.size
    parts = list(topology.partitions) + added
    for ringer, target in grants:
        if ringer not in ids or target not in names:
            missing = ringer if ringer not in ids else target
            raise ConfigError(f"doorbell from {ringer} to {target}: no partition {missing!r}")
        p = parts[ids[ringer]]
        if names[target] in p.doorbells or names[target] == p.id:
            raise ConfigError(f"partition {ringer!r} may ring {target!r} already")
        parts[p.id] = replace(p, doorbells=p.doorbells | {names[target]})
    return Topology(tuple(parts), topology.channels + tuple(new_channels))


def withdraw_partition(topology: Topology, partition: int) -> tuple[Topology, tuple[int, ...]]:
    """``topology`` without partition ``partition`` (destroyed): it keeps its id, with no
    grants; no partition may ring it any more (a DOORBELL to it answers -EPERM, its bit
    leaves every doorbell_mask); every channel it was a member of is withdrawn (no
    members: CHANNEL_ATTACH answers -EPERM, PARTITION_INFO no longer lists it), its id and
    slot kept. Returns the new topology and the ids of the channels withdrawn."""
    gone = tuple(c.id for c in topology.channels if partition in c.members)
    parts = tuple(
        replace(p, doorbells=frozenset() if p.id == partition else p.doorbells - {partition})
        for p in topology.partitions
    )
    chans = tuple(replace(c, members={}) if c.id in gone else c for c in topology.channels)
    return Topology(parts, chans), gone


def config_of(topology: Topology) -> MonitorConfig:
    """A ``MonitorConfig`` of the same shape as ``topology`` (ids, RAM, grants, channel
    sizes and members), each partition named by its id: for the spec's tables
    (``osvmm.hypercall.spec.Spec``) of a topology changed at run time."""
    parts = [
        PartitionConfig(str(p.id), p.ram, p.vcpus, p.privileged, tuple(map(str, p.doorbells)))
        for p in topology.partitions
    ]
    chans = [
        ChannelConfig(c.name, c.size, {str(m): "rw" if w else "ro" for m, w in c.members.items()})
        for c in topology.channels
    ]
    return MonitorConfig(parts, chans)


# ---------------------------------------------------------------------------
# Effects: what the live VMM does after a call.


@dataclass(frozen=True)
class MapChannel:
    partition: int
    channel: int
    gpa: int
    size: int
    writable: bool


@dataclass(frozen=True)
class UnmapChannel:
    partition: int
    channel: int
    gpa: int
    size: int


@dataclass(frozen=True)
class RaiseInterrupt:
    partition: int
    vcpu: int
    vector: int


@dataclass(frozen=True)
class ConsoleWrite:
    partition: int
    gpa: int
    length: int
    data: bytes | None = None  # the bytes, when step was given a memory reader


@dataclass(frozen=True)
class WriteGuest:
    partition: int
    gpa: int
    data: bytes


@dataclass(frozen=True)
class PartitionLifecycle:
    partition: int
    op: ControlOp


Effect = MapChannel | UnmapChannel | RaiseInterrupt | ConsoleWrite | WriteGuest | PartitionLifecycle


class StepResult(NamedTuple):
    """What one call did, as ``step`` returns it. The handlers and ``dispatch`` return
    the same three values as a plain tuple (an ``Outcome``): the live VMM unpacks one
    per hypercall, and a plain tuple costs it nothing to make."""

    state: MonitorState
    result: int  # >= 0 success, -errno failure
    effects: tuple[Effect, ...] = ()

    @property
    def rax(self) -> int:
        """The value the VMM writes to the caller's RAX."""
        return abi.encode_result(self.result)


# (state, result, effects): a StepResult's fields, as the handlers return them.
Outcome = tuple[MonitorState, int, tuple[Effect, ...]]


def _fail(state: MonitorState, err: int) -> Outcome:
    return state, -err, ()


# ---------------------------------------------------------------------------
# The dispatcher.


def step(
    state: MonitorState,
    caller_id: int,
    call_nr: int,
    args: Sequence[int],
    memory_reader: MemoryReader | None = None,
) -> StepResult:
    """Run one hypercall of ``caller_id``; ``args`` are a0..a3 (missing ones are 0)."""
    # The live VMM's case first: a tuple of NUM_ARGS plain ints, used as it is.
    if type(args) is tuple and len(args) == _NUM_ARGS:
        for a in args:
            if type(a) is not int or a < 0 or a > U64_MAX:
                break
        else:
            return StepResult._make(dispatch(state, caller_id, call_nr, args, memory_reader))
    refused = _refusal(state, caller_id, call_nr)
    if refused is not None:
        return StepResult._make(refused)
    if not isinstance(args, tuple | list) or len(args) > _NUM_ARGS:
        return StepResult._make(_fail(state, EINVAL))
    for a in args:
        if not isinstance(a, int) or not 0 <= a <= U64_MAX:
            return StepResult._make(_fail(state, EINVAL))
    full = tuple(int(a) for a in args) + (0,) * (_NUM_ARGS - len(args))
    return StepResult._make(_HANDLERS[call_nr](state, caller_id, full, memory_reader))


def dispatch(
    state: MonitorState,
    caller_id: int,
    call_nr: int,
    args: tuple[int, int, int, int],
    memory_reader: MemoryReader | None = None,
) -> Outcome:
    """``step`` for arguments known to be NUM_ARGS unsigned 64-bit ints (those the
    live VMM unpacks from the caller's registers can be nothing else), its result
    as a plain ``(state, result, effects)`` tuple: the caller and call checks of
    ``_refusal``, inline, then the handler from the table."""
    partitions = state.topology.partitions
    if type(caller_id) is not int or not 0 <= caller_id < len(partitions):
        return _fail(state, ESRCH)
    if state.lifecycle[caller_id] != RUNNING:
        return _fail(state, ESRCH)
    handler = _HANDLERS.get(call_nr) if type(call_nr) is int else None
    if handler is None:
        return _fail(state, ENOSYS)
    return handler(state, caller_id, args, memory_reader)


def _refusal(state: MonitorState, caller_id: int, call_nr: int) -> Outcome | None:
    """The errors that come before any argument's (docs/hypercalls.md): an unknown or
    stopped caller (ESRCH), an unknown call (ENOSYS); None when neither."""
    partitions = state.topology.partitions
    if type(caller_id) is not int or not 0 <= caller_id < len(partitions):
        return _fail(state, ESRCH)
    if state.lifecycle[caller_id] != RUNNING:
        return _fail(state, ESRCH)
    if type(call_nr) is not int or call_nr not in _HANDLERS:
        return _fail(state, ENOSYS)
    return None


# ---------------------------------------------------------------------------
# The six handlers: (state, caller, (a0, a1, a2, a3), memory_reader) -> Outcome.
# Each checks its errors in the order docs/hypercalls.md lists them.


def partition_info_bytes(state: MonitorState, partition: int) -> bytes:
    """The PARTITION_INFO structure of ``partition``."""
    part = state.topology.partitions[partition]
    mine = [c for c in state.topology.channels if partition in c.members]
    flags = abi.INFO_PRIVILEGED if part.privileged else 0
    mask = 0
    for target in part.doorbells | {partition}:
        mask |= 1 << target
    out = bytearray(
        abi.PARTITION_INFO_HEADER.pack(
            abi.ABI_VERSION,
            abi.info_size(len(mine)),
            partition,
            part.vcpus,
            part.memory,
            flags,
            len(mine),
            mask,
        )
    )
    for c in mine:
        cflags = abi.INFO_CHANNEL_WRITABLE if c.members[partition] else 0
        if state.attachment(partition, c.id) is not None:
            cflags |= abi.INFO_CHANNEL_ATTACHED
        out += abi.PARTITION_INFO_CHANNEL.pack(c.id, cflags, c.gpa, c.size)
    return bytes(out)


def partition_info(state, caller, args, memory_reader) -> Outcome:
    buf_gpa, buf_len = args[0], args[1]
    if buf_gpa % abi.PARTITION_INFO_ALIGN:
        return _fail(state, EINVAL)
    if not state.topology.partitions[caller].ram_contains(buf_gpa, buf_len):
        return _fail(state, EFAULT)
    data = partition_info_bytes(state, caller)
    if len(data) > buf_len:
        return _fail(state, ENOSPC)
    return state, len(data), (WriteGuest(caller, buf_gpa, data),)


def console_write(state, caller, args, memory_reader) -> Outcome:
    gpa, length = args[0], args[1]
    if length > abi.CONSOLE_WRITE_MAX:
        return _fail(state, EINVAL)
    if not state.topology.partitions[caller].ram_contains(gpa, length):
        return _fail(state, EFAULT)
    if length == 0:
        return state, 0, ()
    data = None
    if memory_reader is not None:
        try:
            data = bytes(memory_reader(caller, gpa, length))
        except Exception:  # the reader is the VMM's; whatever it raises, the guest sees EFAULT
            return _fail(state, EFAULT)
        if len(data) != length:
            return _fail(state, EFAULT)
    return state, length, (ConsoleWrite(caller, gpa, length, data),)


def doorbell(state, caller, args, memory_reader) -> Outcome:
    target, vcpu, vector = args[0], args[1], args[2]
    partitions = state.topology.partitions
    if target >= len(partitions):
        return _fail(state, ENOENT)
    if not partitions[caller].may_ring(target):
        return _fail(state, EPERM)
    if not abi.VECTOR_MIN <= vector <= abi.VECTOR_MAX:
        return _fail(state, EINVAL)
    if vcpu >= partitions[target].vcpus:
        return _fail(state, EINVAL)
    if state.lifecycle[target] != RUNNING:
        return _fail(state, EBUSY)
    return state, 0, (RaiseInterrupt(target, vcpu, vector),)


def channel_attach(state, caller, args, memory_reader) -> Outcome:
    channel_id, flags = args[0], args[1]
    channels = state.topology.channels
    if channel_id >= len(channels):
        return _fail(state, ENOENT)
    chan = channels[channel_id]
    if caller not in chan.members:
        return _fail(state, EPERM)
    if flags & ~abi.ATTACH_FLAGS:
        return _fail(state, EINVAL)
    if state.attachment(caller, channel_id) is not None:
        return _fail(state, EBUSY)
    writable = chan.members[caller] and not flags & abi.ATTACH_READONLY
    new = replace(state, attachments=state.attachments | {Attachment(caller, chan.id, writable)})
    return new, chan.gpa, (MapChannel(caller, chan.id, chan.gpa, chan.size, writable),)


def channel_detach(state, caller, args, memory_reader) -> Outcome:
    channel_id = args[0]
    channels = state.topology.channels
    if channel_id >= len(channels):
        return _fail(state, ENOENT)
    held = state.attachment(caller, channel_id)
    if held is None:
        return _fail(state, EINVAL)
    chan = channels[channel_id]
    new = replace(state, attachments=state.attachments - {held})
    return new, 0, (UnmapChannel(caller, chan.id, chan.gpa, chan.size),)


def partition_control(state, caller, args, memory_reader) -> Outcome:
    target, op = args[0], args[1]
    partitions = state.topology.partitions
    if target >= len(partitions):
        return _fail(state, ENOENT)
    if op not in _CONTROL_OPS:
        return _fail(state, EINVAL)
    op = ControlOp(op)
    if target == caller:
        if op not in abi.SELF_OPS:
            return _fail(state, EINVAL)
    else:
        if op not in abi.OTHER_OPS:
            return _fail(state, EINVAL)
        if not partitions[caller].privileged:
            return _fail(state, EPERM)
        if op == ControlOp.STOP and state.lifecycle[target] != RUNNING:
            return _fail(state, EBUSY)
        if op == ControlOp.START and state.lifecycle[target] != STOPPED:
            return _fail(state, EBUSY)
    # Every op ends the target's current kernel: it keeps no channel mapped.
    released = state.attached(target)
    channels = state.topology.channels
    effects: list[Effect] = [
        UnmapChannel(target, a.channel, channels[a.channel].gpa, channels[a.channel].size)
        for a in released
    ]
    effects.append(PartitionLifecycle(target, op))
    lifecycle = list(state.lifecycle)
    lifecycle[target] = RUNNING if op in abi.BOOT_OPS else STOPPED
    new = MonitorState(state.topology, tuple(lifecycle), state.attachments - frozenset(released))
    return new, 0, tuple(effects)


_HANDLERS: dict[int, Callable[..., Outcome]] = {
    call.nr: globals()[call.handler] for call in abi.HYPERCALLS
}
# The same table as a tuple indexed by call number (the ABI's are 0..n-1), for the
# live VMM's exit path (osvmm/hypercall/live.py), which does ``dispatch``'s checks
# inline for a caller it knows: tests/test_hypercall_fastpath.py holds the two equal.
HANDLERS_BY_NR = tuple(_HANDLERS[nr] for nr in range(len(_HANDLERS)))
assert sorted(_HANDLERS) == list(range(len(HANDLERS_BY_NR)))
