"""Plausible bugs in the monitor, to show that the model checker finds them.

Each mutant is one small textual edit of one function of
``osvmm.hypercall.monitor`` (the way mutation-testing tools work): the
function's source is edited, compiled into a copy of the module's namespace,
and every other function of the module is rebound to that copy, so the
mutant's ``step`` is the real one with exactly that bug. An edit whose
original text is no longer found exactly once raises ValueError, so a
mutant cannot silently stop applying when the monitor changes.

``python3 -m osvmm.hypercall.mutants`` (or ``osvmm verify --mutant NAME``)
runs the checker against them.
"""

from __future__ import annotations
import __future__

import inspect
import textwrap
import types
from dataclasses import dataclass

from osvmm.hypercall import abi, monitor
from osvmm.hypercall.checker import StepFn


@dataclass(frozen=True)
class Mutant:
    name: str
    function: str  # a function of osvmm.hypercall.monitor
    edits: tuple[tuple[str, str], ...]  # (text of the real function, its replacement)
    description: str
    # True for a bug every invariant lets through: only the comparison with the
    # document's tables (osvmm/hypercall/spec.py) catches it.
    spec_only: bool = False


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "console-start-only",
        "console_write",
        (("ram_contains(gpa, length)", "ram_contains(gpa, 1)"),),
        "CONSOLE_WRITE checks only that the first byte is in the caller's RAM",
    ),
    Mutant(
        "console-length-off-by-one",
        "console_write",
        (("length > abi.CONSOLE_WRITE_MAX", "length > abi.CONSOLE_WRITE_MAX + 1"),),
        "CONSOLE_WRITE accepts one byte more than its documented maximum",
    ),
    Mutant(
        "info-start-only",
        "partition_info",
        (("ram_contains(buf_gpa, buf_len)", "ram_contains(buf_gpa, 1)"),),
        "PARTITION_INFO checks only that the buffer's first byte is in the caller's RAM",
    ),
    Mutant(
        "info-alignment-unchecked",
        "partition_info",
        (("if buf_gpa % abi.PARTITION_INFO_ALIGN:", "if False:"),),
        "PARTITION_INFO accepts a misaligned buffer",
    ),
    Mutant(
        "doorbell-grant-reversed",
        "doorbell",
        (("partitions[caller].may_ring(target)", "partitions[target].may_ring(caller)"),),
        "DOORBELL checks the grant in the wrong direction (target may ring caller)",
    ),
    Mutant(
        "doorbell-vector-unchecked",
        "doorbell",
        (("abi.VECTOR_MIN <= vector <= abi.VECTOR_MAX", "vector <= abi.VECTOR_MAX"),),
        "DOORBELL lets a partition raise exception vectors 0..31",
    ),
    Mutant(
        "doorbell-vcpu-off-by-one",
        "doorbell",
        (("vcpu >= partitions[target].vcpus", "vcpu > partitions[target].vcpus"),),
        "DOORBELL accepts a vCPU index equal to the vCPU count",
    ),
    Mutant(
        "doorbell-stopped-target",
        "doorbell",
        (("if state.lifecycle[target] != RUNNING:", "if False:"),),
        "DOORBELL raises an interrupt in a stopped partition",
    ),
    Mutant(
        "attach-membership-unchecked",
        "channel_attach",
        (
            ("if caller not in chan.members:", "if False:"),
            ("chan.members[caller] and", "chan.members.get(caller, False) and"),
        ),
        "CHANNEL_ATTACH maps a channel for a partition that is not a member",
    ),
    Mutant(
        "attach-ro-writable",
        "channel_attach",
        (("writable = chan.members[caller] and not", "writable = not"),),
        "CHANNEL_ATTACH maps a channel writable for a read-only member",
    ),
    Mutant(
        "attach-size-off-by-one-page",
        "channel_attach",
        (("chan.gpa, chan.size, writable)", "chan.gpa, chan.size + PAGE_SIZE, writable)"),),
        "CHANNEL_ATTACH maps one page more than the channel (into the next slot)",
    ),
    Mutant(
        "attach-twice",
        "channel_attach",
        (("if state.attachment(caller, channel_id) is not None:", "if False:"),),
        "CHANNEL_ATTACH maps an already attached channel again",
    ),
    Mutant(
        "detach-keeps-mapping",
        "channel_detach",
        (("(UnmapChannel(caller, chan.id, chan.gpa, chan.size),)", "()"),),
        "CHANNEL_DETACH forgets the attachment but leaves the mapping",
    ),
    Mutant(
        "detach-keeps-attachment",
        "channel_detach",
        (("new = replace(state, attachments=state.attachments - {held})", "new = state"),),
        "CHANNEL_DETACH unmaps but keeps the attachment in the state",
    ),
    Mutant(
        "detach-wrong-errno",
        "channel_detach",
        (
            (
                "if held is None:\n        return _fail(state, EINVAL)",
                "if held is None:\n        return _fail(state, EPERM)",
            ),
        ),
        "CHANNEL_DETACH of a channel not attached returns -EPERM, not documented for it",
    ),
    Mutant(
        "restart-keeps-attachments",
        "partition_control",
        (
            (
                "released = state.attached(target)",
                "released = () if op in abi.BOOT_OPS else state.attached(target)",
            ),
        ),
        "REBOOT/RESTART/START keep the channels the old kernel had attached",
    ),
    Mutant(
        "privilege-inverted",
        "partition_control",
        (("if not partitions[caller].privileged:", "if partitions[caller].privileged:"),),
        "PARTITION_CONTROL on another partition checks the privilege inverted",
    ),
    Mutant(
        "control-target-off-by-one",
        "partition_control",
        (("if target >= len(partitions):", "if target > len(partitions):"),),
        "PARTITION_CONTROL accepts a target id equal to the partition count",
    ),
)

# Bugs the invariants cannot see: a documented error, but not the first one the
# call's table gives; a value the document rejects, accepted harmlessly; a
# lifecycle transition the ops table forbids, with consistent effects.
MUTANTS += (
    Mutant(
        "doorbell-vector-before-grant",
        "doorbell",
        (
            (
                "    if not partitions[caller].may_ring(target):\n"
                "        return _fail(state, EPERM)\n"
                "    if not abi.VECTOR_MIN <= vector <= abi.VECTOR_MAX:\n"
                "        return _fail(state, EINVAL)\n",
                "    if not abi.VECTOR_MIN <= vector <= abi.VECTOR_MAX:\n"
                "        return _fail(state, EINVAL)\n"
                "    if not partitions[caller].may_ring(target):\n"
                "        return _fail(state, EPERM)\n",
            ),
        ),
        "DOORBELL checks the vector before the grant (-EINVAL where the table gives -EPERM)",
        spec_only=True,
    ),
    Mutant(
        "info-size-before-range",
        "partition_info",
        (
            (
                "    if not state.topology.partitions[caller].ram_contains(buf_gpa, buf_len):\n"
                "        return _fail(state, EFAULT)\n"
                "    data = partition_info_bytes(state, caller)\n"
                "    if len(data) > buf_len:\n"
                "        return _fail(state, ENOSPC)\n",
                "    data = partition_info_bytes(state, caller)\n"
                "    if len(data) > buf_len:\n"
                "        return _fail(state, ENOSPC)\n"
                "    if not state.topology.partitions[caller].ram_contains(buf_gpa, buf_len):\n"
                "        return _fail(state, EFAULT)\n",
            ),
        ),
        "PARTITION_INFO checks the buffer's size before its range (-ENOSPC before -EFAULT)",
        spec_only=True,
    ),
    Mutant(
        "attach-unknown-flags",
        "channel_attach",
        (("if flags & ~abi.ATTACH_FLAGS:", "if False:"),),
        "CHANNEL_ATTACH accepts flags with bits other than ATTACH_READONLY",
        spec_only=True,
    ),
    Mutant(
        "control-start-running",
        "partition_control",
        (("if op == ControlOp.START and state.lifecycle[target] != STOPPED:", "if False:"),),
        "PARTITION_CONTROL STARTs a partition that is running (the table says -EBUSY)",
        spec_only=True,
    ),
)

BY_NAME = {m.name: m for m in MUTANTS}


def mutant_source(mutant: Mutant) -> str:
    """The mutated source of the mutant's function."""
    fn = getattr(monitor, mutant.function)
    src = textwrap.dedent(inspect.getsource(fn))
    for old, new in mutant.edits:
        count = src.count(old)
        if count != 1:
            raise ValueError(
                f"mutant {mutant.name}: {old!r} occurs {count} times in {mutant.function}"
            )
        src = src.replace(old, new)
    return src


def mutant_step(mutant: Mutant) -> StepFn:
    """``monitor.step`` with the mutant's bug (the real module is left untouched)."""
    src = mutant_source(mutant)
    ns = dict(vars(monitor))
    flags = __future__.annotations.compiler_flag
    exec(compile(src, f"<mutant {mutant.name}>", "exec", flags=flags, dont_inherit=True), ns)
    for name, obj in list(ns.items()):
        real = isinstance(obj, types.FunctionType) and obj.__module__ == monitor.__name__
        if real and name != mutant.function:
            clone = types.FunctionType(obj.__code__, ns, obj.__name__, obj.__defaults__)
            clone.__kwdefaults__ = obj.__kwdefaults__
            ns[name] = clone
    ns["_HANDLERS"] = {call.nr: ns[call.handler] for call in abi.HYPERCALLS}
    return ns["step"]


def main() -> int:
    from osvmm.hypercall import checker

    missed = 0
    for m in MUTANTS:
        res = checker.check(step_fn=mutant_step(m))
        if res.ok:
            missed += 1
            print(f"{m.name}: NOT FOUND ({m.description})")
        else:
            print(f"{m.name}: found in {len(res.violation.trace)} calls: {res.violation.message}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
