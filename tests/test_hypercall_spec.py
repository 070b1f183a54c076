"""The executable spec (osvmm/hypercall/spec.py) is docs/hypercalls.md's tables, and the
model checker holds the monitor to it: the spec-only mutants pass every invariant and
are caught only by the comparison."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from osvmm.arch.x86 import layout
from osvmm.hypercall import abi, checker, monitor, mutants, spec
from tests.test_hypercall_abi import DOC, doc_sections

SPEC_ONLY = [m for m in mutants.MUTANTS if m.spec_only]


def error_rows(text: str) -> list[tuple[str, str]]:
    """(error name, "when" text) of each row of the error tables in ``text``, in order."""
    return re.findall(r"^\| -(E[A-Z]+) \| (.*) \|$", text, flags=re.M)


def spec_rows(rows) -> list[tuple[str, str]]:
    return [(abi.ERROR_NAMES[r.errno], r.when) for r in rows]


@pytest.mark.parametrize("call", abi.HYPERCALLS, ids=lambda c: c.name)
def test_each_error_table_is_the_documents_in_order(call):
    _, _, text = doc_sections()[call.nr]
    assert spec_rows(spec.ERRORS[call.nr]) == error_rows(text)


def test_dispatcher_table_is_the_documents_in_order():
    text = DOC.read_text().split("## Concepts")[0]
    assert spec_rows(spec.DISPATCH_ERRORS) == error_rows(text)


def test_ops_table_is_the_documents():
    _, _, text = doc_sections()[abi.PARTITION_CONTROL]
    rows = re.findall(r"^\| (\d) \| ([A-Z]+) \| (.*) \| (.*) \|$", text, flags=re.M)
    assert [(int(n), name, target, effect) for n, name, target, effect in rows] == [
        (op.nr, op.name, op.target, op.effect) for op in spec.OPS
    ]
    assert [op.name for op in spec.OPS] == [op.name for op in abi.ControlOp]
    assert {op.nr for op in spec.OPS if op.on_self} == set(abi.SELF_OPS)
    assert {op.nr for op in spec.OPS if op.after == spec.RUNNING} == set(abi.BOOT_OPS)


def test_the_spec_restates_the_documents_constants():
    assert spec.ERRNO == {name: err for err, name in abi.ERROR_NAMES.items()}
    assert spec.CALL_NAMES == tuple(c.name for c in abi.HYPERCALLS)
    assert (spec.VECTOR_MIN, spec.VECTOR_MAX) == (abi.VECTOR_MIN, abi.VECTOR_MAX)
    assert spec.CONSOLE_WRITE_MAX == abi.CONSOLE_WRITE_MAX
    assert spec.ATTACH_READONLY == abi.ATTACH_READONLY == abi.ATTACH_FLAGS
    assert spec.INFO_HEADER_SIZE == abi.PARTITION_INFO_HEADER.size
    assert spec.INFO_ENTRY_SIZE == abi.PARTITION_INFO_CHANNEL.size
    assert spec.INFO_ALIGN == abi.PARTITION_INFO_ALIGN and spec.ABI_VERSION == abi.ABI_VERSION
    assert spec.CHANNEL_WINDOW_START == layout.CHANNEL_WINDOW_START
    text = DOC.read_text()
    assert "CHANNEL_WINDOW_START = 0xd000_0000" in text and "len > 4096" in text


def test_the_spec_is_written_apart_from_the_monitor():
    tree = ast.parse(Path(spec.__file__).read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not any(name and name.startswith("osvmm") for name in imported), imported


def test_the_real_monitor_is_what_the_document_prescribes():
    res = checker.check()
    assert res.ok and res.closed and res.against_spec, checker.format_result(res)
    assert "what docs/hypercalls.md prescribes" in checker.format_result(res)


@pytest.mark.parametrize("mutant", SPEC_ONLY, ids=lambda m: m.name)
def test_spec_only_mutants_pass_the_invariants_and_fail_the_spec(mutant):
    step = mutants.mutant_step(mutant)
    assert checker.check(step_fn=step, against_spec=False).ok, "the invariants catch it already"
    res = checker.check(step_fn=step)
    assert not res.ok and "docs/hypercalls.md prescribes" in res.violation.message
    assert res.violation.trace


def test_spec_only_mutants_cover_order_values_and_lifecycle():
    names = {m.name for m in SPEC_ONLY}
    assert {"doorbell-vector-before-grant", "info-size-before-range"} <= names  # order
    assert "attach-unknown-flags" in names  # a rejected value accepted
    assert "control-start-running" in names  # a forbidden lifecycle transition


def test_mismatch_messages_name_the_documents_row():
    m = mutants.BY_NAME["doorbell-vector-before-grant"]
    text = checker.format_result(checker.check(step_fn=mutants.mutant_step(m)))
    assert (
        "VIOLATION: DOORBELL returned -EINVAL; docs/hypercalls.md prescribes -EPERM (-EPERM: the "
        "target is another partition and the caller has no doorbell to it)" in text
    )


def test_effects_and_state_are_compared_too():
    config = checker.default_config()
    state = monitor.MonitorState.from_config(config)
    prescribed = spec.Spec(config)

    def wrong_slot(src, caller, nr, args, memory_reader=None):
        r = monitor.step(src, caller, nr, args)
        if r.effects and isinstance(r.effects[0], monitor.MapChannel):
            e = r.effects[0]
            bad = monitor.MapChannel(e.partition, e.channel, e.gpa, e.size, not e.writable)
            return monitor.StepResult(r.state, r.result, (bad,))
        return r

    res = wrong_slot(state, 0, abi.CHANNEL_ATTACH, (0, abi.ATTACH_READONLY, 0, 0))
    msg = checker.spec_mismatch(prescribed, state, 0, abi.CHANNEL_ATTACH, (0, 1, 0, 0), res)
    assert msg == (
        "CHANNEL_ATTACH's effects are [MapChannel(0, 0, 0xd0000000, 0x2000, True)]; "
        "docs/hypercalls.md prescribes [MapChannel(0, 0, 0xd0000000, 0x2000, False)]"
    )
    good = monitor.step(state, 0, abi.CHANNEL_ATTACH, (0, 1, 0, 0))
    kept = monitor.StepResult(state, good.result, good.effects)
    msg = checker.spec_mismatch(prescribed, state, 0, abi.CHANNEL_ATTACH, (0, 1, 0, 0), kept)
    assert msg.startswith("after CHANNEL_ATTACH, attachments []")


def test_dispatcher_checks_the_caller_before_the_call_number():
    config = checker.default_config()
    prescribed = spec.Spec(config)
    stopped = ("stopped", "running", "running")
    out = prescribed.outcome(stopped, frozenset(), 0, 99, (0, 0, 0, 0))
    assert out.result == -abi.ESRCH
    state = monitor.MonitorState(monitor.MonitorState.from_config(config).topology, stopped)
    assert monitor.step(state, 0, 99, (0, 0, 0, 0)).result == -abi.ESRCH


def test_arguments_no_register_holds_are_outside_the_spec():
    prescribed = spec.Spec(checker.default_config())
    running = ("running",) * 3
    for args in ((-1, 0), (0, 0, 1 << 64), (0,) * 5):
        assert prescribed.outcome(running, frozenset(), 0, abi.DOORBELL, args) is None


def test_partition_info_structure_from_the_document_tables():
    config = checker.default_config()
    state = monitor.MonitorState.from_config(config)
    attached = monitor.step(state, 1, abi.CHANNEL_ATTACH, (1, 0, 0, 0)).state
    held = checker.attachment_tuples(attached)
    for pid in range(3):
        assert spec.info_structure(spec.Spec(config).cfg, held, pid) == (
            monitor.partition_info_bytes(attached, pid)
        )
