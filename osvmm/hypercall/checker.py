"""An exhaustive explicit-state model checker over the real ``monitor.step``.

From the initial state of a bounded configuration, breadth-first: every
running partition makes every hypercall with every combination of adversarial
argument values (valid ids and ids out of range, 2^63, 2^64-1, misaligned
addresses, addresses at the edges of each RAM range and of the MMIO hole,
inside the channel window, vectors 0/31/32/255/256, ...). States are hashed and
visited once. After every transition the invariants below are checked; the
first violation stops the search, and since the search is breadth-first the
call sequence printed for it is a shortest one.

Invariants (each transition: state S, caller c, call, result r, state S', effects E):
  - step returns a StepResult and raises nothing;
  - r is >= 0 (and below 2^63) or minus an error that the ABI table documents
    for the call; unknown call numbers give -ENOSYS; a caller that is not
    running gets -ESRCH;
  - a failed call changes nothing and has no effects;
  - each effect is of a kind the call may have, concerns the caller (or the
    target of a lifecycle op), and stays in bounds: guest writes and console
    reads inside the caller's own RAM, interrupts only along doorbell grants
    (or to itself) with a vector in 32..255 and an existing vCPU of a running
    target, lifecycle ops on another partition only from the privileged one;
  - mappings: a MapChannel maps exactly the channel's slot, only for a member,
    writable only for an "rw" member, never twice; an UnmapChannel removes a
    mapping that exists. The mappings obtained by applying the effects equal
    the attachments in S' (nothing leaks or lingers), so the memory a partition
    reaches is its own RAM plus the slots of channels granted to it;
  - lifecycle in S' is what the effects say; a stopped partition, and the
    target of any lifecycle op, holds no attachments.
The configuration's layout is checked once: channel slots are disjoint, inside
the channel window and disjoint from every partition's RAM.

Then each transition is compared with docs/hypercalls.md's prescription
(``osvmm/hypercall/spec.py``, written from the document, not from the
monitor): the result must be the first applicable error of the call's table,
in the table's order, or the documented success value; the effects, in
order, and S' must be what the document says. This catches what the
invariants let through: another documented error than the first applicable
one, a value the document rejects accepted harmlessly, a lifecycle op the
ops table forbids (``mutants.py``: the ``spec_only`` ones).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from osvmm.arch.x86 import layout
from osvmm.errors import ConfigError
from osvmm.hypercall import abi, monitor
from osvmm.hypercall.abi import ControlOp
from osvmm.hypercall.monitor import (
    RUNNING,
    ChannelConfig,
    ConsoleWrite,
    MapChannel,
    MonitorConfig,
    MonitorState,
    PartitionConfig,
    PartitionLifecycle,
    RaiseInterrupt,
    StepResult,
    Topology,
    UnmapChannel,
    WriteGuest,
)
from osvmm.hypercall.spec import Spec
from osvmm.machine import Machine

U64_MAX = abi.U64_MAX
KiB, MiB, GiB = layout.KiB, layout.MiB, layout.GiB

StepFn = Callable[..., StepResult]
_OPS = frozenset(ControlOp)

DEFAULT_DEPTH = 8
DEFAULT_PARTITIONS = 3
MAX_PARTITIONS = 6

# The kinds of effect each call may have.
_ALLOWED_EFFECTS = {
    abi.PARTITION_INFO: (WriteGuest,),
    abi.CONSOLE_WRITE: (ConsoleWrite,),
    abi.DOORBELL: (RaiseInterrupt,),
    abi.CHANNEL_ATTACH: (MapChannel,),
    abi.CHANNEL_DETACH: (UnmapChannel,),
    abi.PARTITION_CONTROL: (UnmapChannel, PartitionLifecycle),
}


def default_config(partitions: int = DEFAULT_PARTITIONS) -> MonitorConfig:
    """The bounded configuration the checker explores.

    A is privileged; doorbells go A->B->C->... (never back); ch0: A rw, B ro;
    ch1: B rw, C rw (and any further partition ro). C has 3 GiB + 2 MiB of RAM,
    so its RAM is split around the MMIO hole.
    """
    if not 3 <= partitions <= MAX_PARTITIONS:
        raise ConfigError(f"--partitions {partitions}: the checker takes 3..{MAX_PARTITIONS}")
    names = [chr(ord("A") + i) for i in range(partitions)]
    memory = {0: 2 * MiB, 1: 4 * MiB, 2: 3 * GiB + 2 * MiB}
    parts = [
        PartitionConfig(
            name=name,
            ram=Machine.build(memory.get(i, 2 * MiB), min(i + 1, 3)).ram_ranges,
            vcpus=min(i + 1, 3),
            privileged=i == 0,
            doorbells=(names[i + 1],) if i + 1 < partitions else (),
        )
        for i, name in enumerate(names)
    ]
    ch1 = {"B": "rw", "C": "rw"} | {name: "ro" for name in names[3:]}
    channels = [
        ChannelConfig("ch0", 8 * KiB, {"A": "rw", "B": "ro"}),
        ChannelConfig("ch1", 4 * KiB, ch1),
    ]
    return MonitorConfig(parts, channels)


def adversarial_calls(topology: Topology) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Every (call number, args) the checker makes, in a fixed order."""
    parts, chans = topology.partitions, topology.channels
    addrs = {0, 1, 7, 8, 4 * KiB, layout.MMIO_HOLE_START, layout.CHANNEL_WINDOW_START}
    addrs |= {layout.MMIO_HOLE_END, 1 << 63, U64_MAX - 7, U64_MAX}
    for p in parts:
        for start, size in p.ram:
            end = start + size
            addrs |= {start, end - 4 * KiB, end - 8, end}
    for c in chans:
        addrs |= {c.gpa, c.gpa + c.size - 8}
    info_sizes = {abi.info_size(n) for n in range(len(chans) + 1)}
    lengths = {0, 8, abi.CONSOLE_WRITE_MAX, abi.CONSOLE_WRITE_MAX + 1, 1 << 63, U64_MAX}
    lengths |= info_sizes | {s - 1 for s in info_sizes}
    targets = list(range(len(parts) + 1)) + [1 << 32, U64_MAX]
    vcpus = list(range(max(p.vcpus for p in parts) + 1)) + [U64_MAX]
    vectors = [0, 31, 32, 255, 256, U64_MAX]
    chan_ids = list(range(len(chans) + 1)) + [U64_MAX]
    flags = [0, abi.ATTACH_READONLY, 2, U64_MAX]
    ops = [int(op) for op in ControlOp] + [len(ControlOp), U64_MAX]

    calls: list[tuple[int, tuple[int, ...]]] = []
    for nr in (abi.PARTITION_INFO, abi.CONSOLE_WRITE):
        calls += [(nr, (a, n, 0, 0)) for a in sorted(addrs) for n in sorted(lengths)]
    calls += [(abi.DOORBELL, (t, v, x, 0)) for t in targets for v in vcpus for x in vectors]
    calls += [(abi.CHANNEL_ATTACH, (c, f, 0, 0)) for c in chan_ids for f in flags]
    calls += [(abi.CHANNEL_DETACH, (c, 0, 0, 0)) for c in chan_ids]
    calls += [(abi.PARTITION_CONTROL, (t, op, 0, 0)) for t in targets for op in ops]
    # Unknown call numbers, and argument lists a register could not hold.
    calls += [(nr, (0, 0, 0, 0)) for nr in (len(abi.HYPERCALLS), 1 << 32, U64_MAX, -1)]
    calls += [(abi.CHANNEL_ATTACH, (-1, 0)), (abi.DOORBELL, (0, 0, 1 << 64)), (0, (0,) * 5)]
    return tuple(calls)


def probe_calls() -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Calls made by partitions that are not running (each must get -ESRCH, an unknown
    call number too: the dispatcher checks the caller first)."""
    return tuple((call.nr, (0, 0, 0, 0)) for call in abi.HYPERCALLS) + (
        (abi.CHANNEL_ATTACH, (1, 0, 0, 0)),
        (len(abi.HYPERCALLS), (0, 0, 0, 0)),
    )


# ---------------------------------------------------------------------------
# Results.


@dataclass(frozen=True)
class Call:
    caller: int
    nr: int
    args: tuple[int, ...]
    result: int | None  # None where step raised or returned no StepResult

    def describe(self, topology: Topology) -> str:
        caller = topology.partitions[self.caller].name
        call = abi.BY_NUMBER.get(self.nr)
        if call is None:
            text = f"call {_num(self.nr)}({', '.join(_num(a) for a in self.args)})"
        else:
            names = list(call.args) + [f"a{i}" for i in range(len(call.args), len(self.args))]
            pairs = list(zip(names, self.args, strict=False))
            if len(self.args) == abi.NUM_ARGS:
                pairs = pairs[: len(call.args)]  # the unused registers are ignored
            shown = [f"{n}={_num(a)}" for n, a in pairs]
            if call.nr == abi.PARTITION_CONTROL and self.args[1] in _OPS:
                shown[1] = f"op={ControlOp(self.args[1]).name}"
            text = f"{call.name}({', '.join(shown)})"
        result = "raised" if self.result is None else abi.result_name(self.result)
        return f"{caller}: {text} = {result}"


def _num(v: int) -> str:
    return f"{v:#x}" if v > 255 else str(v)


@dataclass(frozen=True)
class Violation:
    message: str
    trace: tuple[Call, ...]  # a shortest call sequence; the last call violates


@dataclass(frozen=True)
class CheckResult:
    states: int
    transitions: int
    depth: int  # levels of calls explored
    closed: bool  # True when no new state appeared: every sequence length is covered
    seconds: float
    violation: Violation | None
    topology: Topology
    against_spec: bool = True  # each transition was compared with docs/hypercalls.md

    @property
    def ok(self) -> bool:
        return self.violation is None


def describe_topology(topo: Topology) -> list[str]:
    """One line per partition and channel of the configuration."""
    lines = []
    for p in topo.partitions:
        rings = ", ".join(topo.partitions[t].name for t in sorted(p.doorbells)) or "none"
        priv = "privileged, " if p.privileged else ""
        ram = " + ".join(f"{s:#x}..{s + n:#x}" for s, n in p.ram)
        lines.append(f"partition {p.id} {p.name}: {priv}{p.vcpus} vCPU, RAM {ram}, rings {rings}")
    for c in topo.channels:
        members = ", ".join(
            f"{topo.partitions[m].name} {'rw' if w else 'ro'}" for m, w in sorted(c.members.items())
        )
        lines.append(f"channel {c.id} {c.name}: {c.gpa:#x}+{c.size:#x}, {members}")
    return lines


def _depth_note(res: CheckResult) -> str:
    if res.violation is not None:
        return "stopped at the first violation"
    return "state space closed: every sequence length covered" if res.closed else "bound reached"


def format_result(res: CheckResult) -> str:
    lines = describe_topology(res.topology) + [
        f"states explored: {res.states}",
        f"transitions: {res.transitions}",
        f"depth: {res.depth} ({_depth_note(res)})",
        f"time: {res.seconds:.1f} s",
    ]
    if res.violation is None:
        lines.append("all invariants hold")
        if res.against_spec:
            lines.append("every result, effect and state is what docs/hypercalls.md prescribes")
    else:
        v = res.violation
        lines.append(f"VIOLATION: {v.message}")
        lines.append(f"shortest call sequence ({len(v.trace)} calls) from the initial state:")
        for i, call in enumerate(v.trace, 1):
            lines.append(f"  {i}. {call.describe(res.topology)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The search.


def check(
    config: MonitorConfig | None = None,
    *,
    depth: int = DEFAULT_DEPTH,
    step_fn: StepFn = monitor.step,
    calls: tuple[tuple[int, tuple[int, ...]], ...] | None = None,
    against_spec: bool = True,
) -> CheckResult:
    """Explore every call sequence of up to ``depth`` calls; stop at the first violation.

    ``against_spec``: compare each transition with docs/hypercalls.md's prescription
    (``spec.Spec``) as well as checking the invariants."""
    if depth < 1:
        raise ConfigError(f"--depth {depth}: must be at least 1")
    start = time.monotonic()
    config = config or default_config()
    init = MonitorState.from_config(config)
    prescribed = Spec(config) if against_spec else None
    topo = init.topology
    if calls is None:
        calls = adversarial_calls(topo)
    probes = probe_calls()
    n = len(topo.partitions)
    parent: dict[MonitorState, tuple[MonitorState, Call] | None] = {init: None}
    transitions = 0
    level = 0

    def done(violation: Violation | None, closed: bool) -> CheckResult:
        secs = time.monotonic() - start
        return CheckResult(
            len(parent), transitions, level, closed, secs, violation, topo, against_spec
        )

    def trace_to(state: MonitorState) -> list[Call]:
        out: list[Call] = []
        link = parent[state]
        while link is not None:
            state, call = link
            out.append(call)
            link = parent[state]
        return out[::-1]

    msg = check_layout(topo)
    if msg:
        return done(Violation(msg, ()), False)
    frontier = [init]
    while frontier and level < depth:
        level += 1
        nxt: list[MonitorState] = []
        for src in frontier:
            held = attachment_tuples(src)
            for caller in range(n):
                todo = calls if src.lifecycle[caller] == RUNNING else probes
                for nr, args in todo:
                    transitions += 1
                    try:
                        res = step_fn(src, caller, nr, args)
                    except Exception as e:
                        call = Call(caller, nr, args, None)
                        what = f"step raised {type(e).__name__}: {e}"
                        return done(Violation(what, (*trace_to(src), call)), False)
                    msg = check_transition(topo, src, caller, nr, args, res)
                    if msg is None and prescribed is not None:
                        msg = spec_mismatch(prescribed, src, caller, nr, args, res, held)
                    result = res.result if isinstance(res, StepResult) else None
                    if msg:
                        call = Call(caller, nr, args, result)
                        return done(Violation(msg, (*trace_to(src), call)), False)
                    dst = res.state
                    if dst not in parent:
                        parent[dst] = (src, Call(caller, nr, args, result))
                        nxt.append(dst)
        frontier = nxt
    return done(None, not frontier)


def check_layout(topo: Topology) -> str | None:
    """Channel slots: inside the window, disjoint from each other and from all RAM."""
    win_lo = layout.CHANNEL_WINDOW_START
    win_hi = win_lo + layout.CHANNEL_WINDOW_SIZE
    ranges = [(c.gpa, c.gpa + c.size, f"channel {c.name}") for c in topo.channels]
    for c in topo.channels:
        if not (win_lo <= c.gpa and c.gpa + c.size <= win_hi):
            return f"channel {c.name} slot {c.gpa:#x}+{c.size:#x} is outside the channel window"
    for p in topo.partitions:
        ranges += [(s, s + size, f"RAM of {p.name}") for s, size in p.ram]
    chans = ranges[: len(topo.channels)]
    for i, (lo, hi, what) in enumerate(chans):
        for lo2, hi2, what2 in ranges[i + 1 :]:
            if lo < hi2 and lo2 < hi:
                return f"{what} at {lo:#x}..{hi:#x} overlaps {what2}"
    return None


def check_transition(
    topo: Topology, src: MonitorState, caller: int, nr: int, args: tuple, res: object
) -> str | None:
    """The invariants of one transition; a message when one is violated."""
    if not isinstance(res, StepResult):
        return f"step returned {type(res).__name__}, not a StepResult"
    r, dst, effects = res.result, res.state, res.effects
    if type(r) is not int:
        return f"result {r!r} is not an int"
    if not isinstance(dst, MonitorState) or dst.topology is not topo:
        return "step returned a state of another topology"
    if not isinstance(effects, tuple):
        return "effects are not a tuple"
    call = abi.BY_NUMBER.get(nr) if type(nr) is int else None
    if src.lifecycle[caller] != RUNNING:
        expect, why = -abi.ESRCH, "a call from a partition that is not running"
    elif call is None:
        expect, why = -abi.ENOSYS, f"unknown call number {nr}"
    else:
        expect = None
    if expect is not None:
        if r != expect or dst != src or effects:
            return f"{why} must give {abi.result_name(expect)} and change nothing"
        return None
    name = call.name
    if r < 0:
        if -r not in call.errors:
            return f"{name} returned {abi.result_name(r)}, not a documented error of the call"
        if dst != src or effects:
            return f"{name} failed with {abi.result_name(r)} but changed state or had effects"
        return None
    if r >= 1 << 63:
        return f"{name} returned {r:#x}, which a guest reads as negative"
    return _check_effects(topo, src, caller, call, args, r, dst, effects)


def _check_effects(topo, src, caller, call, args, r, dst, effects) -> str | None:
    parts, chans = topo.partitions, topo.channels
    me = parts[caller]
    name = call.name
    allowed = _ALLOWED_EFFECTS[call.nr]
    mapped = {(a.partition, a.channel): a.writable for a in src.attachments}
    lifecycle = list(src.lifecycle)
    unmapped: set[int] = set()
    lifecycle_targets: set[int] = set()
    for e in effects:
        if not isinstance(e, allowed):
            return f"{name} had a {type(e).__name__} effect"
        if isinstance(e, MapChannel):
            if e.partition != caller:
                return f"{name} mapped a channel into partition {e.partition}, not the caller"
            if not 0 <= e.channel < len(chans):
                return f"{name} mapped unknown channel {e.channel}"
            ch = chans[e.channel]
            if caller not in ch.members:
                return f"{me.name} mapped channel {ch.name}, which the plan does not grant it"
            if (e.gpa, e.size) != (ch.gpa, ch.size):
                return (
                    f"{me.name} mapped {e.gpa:#x}+{e.size:#x} for channel {ch.name}, whose slot "
                    f"is {ch.gpa:#x}+{ch.size:#x}: it reaches memory not granted to it"
                )
            if e.writable and not ch.members[caller]:
                return f"{me.name} is a read-only member of {ch.name} but got a writable mapping"
            if (caller, e.channel) in mapped:
                return f"{me.name} mapped channel {ch.name} twice"
            if r != e.gpa:
                return f"{name} returned {r:#x} but mapped {ch.name} at {e.gpa:#x}"
            mapped[(caller, e.channel)] = e.writable
        elif isinstance(e, UnmapChannel):
            key = (e.partition, e.channel)
            if key not in mapped:
                return f"{name} unmapped channel {e.channel} from {e.partition}, not mapped there"
            ch = chans[e.channel]
            if (e.gpa, e.size) != (ch.gpa, ch.size):
                return f"{name} unmapped {e.gpa:#x}+{e.size:#x}, not the slot of {ch.name}"
            del mapped[key]
            unmapped.add(e.partition)
        elif isinstance(e, RaiseInterrupt):
            if not 0 <= e.partition < len(parts) or not me.may_ring(e.partition):
                return f"{me.name} rang partition {e.partition} without a doorbell grant to it"
            if not abi.VECTOR_MIN <= e.vector <= abi.VECTOR_MAX:
                return f"{name} raised vector {e.vector}, outside 32..255"
            if not 0 <= e.vcpu < parts[e.partition].vcpus:
                return f"{name} raised an interrupt on vCPU {e.vcpu}, which does not exist"
            if src.lifecycle[e.partition] != RUNNING:
                return f"{name} raised an interrupt in a partition that is not running"
            if r != 0:
                return f"{name} succeeded with {r}, not 0"
        elif isinstance(e, ConsoleWrite):
            if e.partition != caller:
                return f"{me.name}'s {name} reads memory of partition {e.partition}"
            if not 0 < e.length <= abi.CONSOLE_WRITE_MAX:
                return f"{name} of {e.length} bytes: outside 1..{abi.CONSOLE_WRITE_MAX}"
            if not me.ram_contains(e.gpa, e.length):
                return (
                    f"{name} reads {e.gpa:#x}+{e.length:#x}, outside {me.name}'s RAM: "
                    "it reaches memory not granted to it"
                )
            if r != e.length:
                return f"{name} returned {r} for {e.length} bytes"
        elif isinstance(e, WriteGuest):
            if e.partition != caller or not me.ram_contains(e.gpa, len(e.data)):
                return (
                    f"{name} writes {e.gpa:#x}+{len(e.data):#x} of partition {e.partition}, "
                    f"outside {me.name}'s RAM: it reaches memory not granted to it"
                )
            if e.gpa % abi.PARTITION_INFO_ALIGN:
                return f"{name} wrote to {e.gpa:#x}, not aligned to {abi.PARTITION_INFO_ALIGN}"
            if len(e.data) > args[1] or r != len(e.data):
                return f"{name} wrote {len(e.data)} bytes for a {args[1]}-byte buffer"
        elif isinstance(e, PartitionLifecycle):
            op = e.op
            if not 0 <= e.partition < len(parts) or op not in _OPS:
                return f"{name} had a lifecycle effect {op!r} on partition {e.partition}"
            if e.partition == caller:
                if op not in abi.SELF_OPS:
                    return f"{me.name} did {ControlOp(op).name} on itself"
            else:
                if not me.privileged:
                    return f"{me.name} is not privileged but did {ControlOp(op).name} on another"
                if op not in abi.OTHER_OPS:
                    return f"{me.name} did {ControlOp(op).name} on another partition"
            if lifecycle_targets:
                return f"{name} had two lifecycle effects"
            lifecycle_targets.add(e.partition)
            lifecycle[e.partition] = RUNNING if op in abi.BOOT_OPS else monitor.STOPPED
    if call.nr in (abi.CHANNEL_DETACH, abi.PARTITION_CONTROL) and r != 0:
        return f"{name} succeeded with {r}, not 0"
    for p in unmapped:
        if p != caller and p not in lifecycle_targets:
            return f"{me.name}'s {name} unmapped a channel of partition {parts[p].name}"

    in_state = {(a.partition, a.channel): a.writable for a in dst.attachments}
    if in_state != mapped:
        kept = sorted(set(mapped.items()) - set(in_state.items()))
        missing = sorted(set(in_state.items()) - set(mapped.items()))
        if kept:
            p, c = kept[0][0]
            return (
                f"after {name}, {parts[p].name} still has channel {chans[c].name} mapped "
                "but the state holds no such attachment (a leaked mapping)"
            )
        p, c = missing[0][0]
        return (
            f"after {name}, the state says {parts[p].name} holds channel {chans[c].name} "
            "but the effects leave it unmapped"
        )
    if tuple(lifecycle) != dst.lifecycle:
        return f"after {name}, lifecycle {dst.lifecycle} differs from the effects' {lifecycle}"
    for a in dst.attachments:
        if dst.lifecycle[a.partition] != RUNNING or a.partition in lifecycle_targets:
            return (
                f"after {name}, {parts[a.partition].name} holds channel {chans[a.channel].name} "
                "across a stop or restart"
            )
    return None


# ---------------------------------------------------------------------------
# The transition against the document (osvmm/hypercall/spec.py).


def effect_tuple(effect: object) -> tuple:
    """An effect as the spec writes it: (kind, fields...); ConsoleWrite without its data."""
    kind = type(effect).__name__
    if isinstance(effect, ConsoleWrite):
        return (kind, effect.partition, effect.gpa, effect.length)
    if isinstance(effect, PartitionLifecycle):
        return (kind, effect.partition, int(effect.op))
    return (kind, *(getattr(effect, f.name) for f in fields(effect)))


def attachment_tuples(state: MonitorState) -> frozenset[tuple[int, int, bool]]:
    return frozenset((a.partition, a.channel, a.writable) for a in state.attachments)


def spec_mismatch(
    prescribed: Spec,
    src: MonitorState,
    caller: int,
    nr: int,
    args: tuple,
    res: StepResult,
    held: frozenset[tuple[int, int, bool]] | None = None,
) -> str | None:
    """Where the transition differs from what docs/hypercalls.md prescribes, or None.
    ``held``: ``attachment_tuples(src)``, when the caller has it already."""
    if held is None:
        held = attachment_tuples(src)
    want = prescribed.outcome(src.lifecycle, held, caller, nr, args)
    if want is None:  # arguments no register holds: the invariants cover it
        return None
    call = abi.BY_NUMBER.get(nr)
    name = call.name if call is not None else f"call {nr}"
    doc = "docs/hypercalls.md prescribes"
    if nr == abi.CONSOLE_WRITE and res.result == -abi.EFAULT and want.result > 0:
        return None  # "or the VMM could not read it": the memory reader failed (live)
    if res.result != want.result:
        return (
            f"{name} returned {abi.result_name(res.result)}; {doc} "
            f"{abi.result_name(want.result)} ({want.why})"
        )
    got = tuple(effect_tuple(e) for e in res.effects)
    if got != want.effects:
        return f"{name}'s effects are {_show_effects(got)}; {doc} {_show_effects(want.effects)}"
    if res.state.lifecycle != want.lifecycle:
        return f"after {name}, lifecycle {res.state.lifecycle}; {doc} {want.lifecycle}"
    after = held if res.state is src else attachment_tuples(res.state)
    if after != want.attachments:
        return (
            f"after {name}, attachments {sorted(attachment_tuples(res.state))}; "
            f"{doc} {sorted(want.attachments)}"
        )
    return None


def _show_effects(effects: tuple[tuple, ...]) -> str:
    def one(e: tuple) -> str:
        shown = [f"{len(v)} bytes" if isinstance(v, bytes) else _num(v) for v in e[1:]]
        return f"{e[0]}({', '.join(shown)})"

    return "[" + ", ".join(one(e) for e in effects) + "]" if effects else "none"
