"""The model checker: the real monitor passes, every mutant is caught, output is deterministic."""

from __future__ import annotations

import argparse
import inspect
import textwrap

import pytest

from osvmm.errors import ConfigError
from osvmm.hypercall import abi, checker, command, monitor, mutants


@pytest.fixture(scope="module")
def real_result() -> checker.CheckResult:
    return checker.check()


def test_real_monitor_holds_every_invariant(real_result):
    assert real_result.ok, checker.format_result(real_result)
    assert real_result.closed  # the whole state space, not just the bound
    assert real_result.states > 50 and real_result.transitions > 100_000


def test_checker_is_deterministic(real_result):
    again = checker.check()
    assert (again.states, again.transitions, again.depth, again.closed) == (
        real_result.states,
        real_result.transitions,
        real_result.depth,
        real_result.closed,
    )
    m = mutants.BY_NAME["restart-keeps-attachments"]
    one = checker.check(step_fn=mutants.mutant_step(m))
    two = checker.check(step_fn=mutants.mutant_step(m))
    assert one.violation == two.violation and one.states == two.states


def test_depth_bound_is_respected():
    res = checker.check(depth=1)
    assert res.ok and res.depth == 1 and not res.closed


def test_adversarial_values_cover_the_edges():
    topo = monitor.MonitorState.from_config(checker.default_config()).topology
    calls = checker.adversarial_calls(topo)
    values = {a for _, args in calls for a in args}
    for v in (0, 1, 31, 32, 255, 256, 1 << 63, abi.U64_MAX, 2 * 1024 * 1024 - 8, 0xC000_0000):
        assert v in values
    assert {nr for nr, _ in calls} >= set(abi.BY_NUMBER) | {6, abi.U64_MAX}


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_is_caught(mutant):
    res = checker.check(step_fn=mutants.mutant_step(mutant))
    assert not res.ok, f"{mutant.name} not caught: {mutant.description}"
    assert res.violation.trace  # a call sequence that reaches it
    if not mutant.spec_only:  # the invariants alone catch it too
        alone = checker.check(step_fn=mutants.mutant_step(mutant), against_spec=False)
        assert not alone.ok, f"{mutant.name}: only the spec catches it; mark it spec_only"


def test_mutants_are_distinct_real_edits_of_every_handler():
    """Each mutant changes its function's code, no two give the same code, and every
    handler is mutated: the count is of bugs the checker faces, not of table rows."""
    distinct = set()
    for m in mutants.MUTANTS:
        real = textwrap.dedent(inspect.getsource(getattr(monitor, m.function)))
        mutated = mutants.mutant_source(m)
        assert mutated != real, f"{m.name} edits nothing"
        distinct.add((m.function, mutated))
    assert len(distinct) == len(mutants.MUTANTS) == len(mutants.BY_NAME) >= 8
    assert {f for f, _ in distinct} >= {c.handler for c in abi.HYPERCALLS}


def test_mutants_leave_the_real_monitor_alone():
    for m in mutants.MUTANTS:
        mutants.mutant_step(m)
    r = monitor.step(monitor.MonitorState.from_config(checker.default_config()), 1, 2, (0, 0, 32))
    assert r.result == -abi.EPERM  # doorbell-grant-reversed did not leak into monitor


def test_stale_mutant_is_an_error():
    stale = mutants.Mutant("stale", "doorbell", (("no such text", "x"),), "")
    with pytest.raises(ValueError, match="occurs 0 times"):
        mutants.mutant_step(stale)


def test_trace_is_shortest_and_printed():
    m = mutants.BY_NAME["detach-keeps-mapping"]
    res = checker.check(step_fn=mutants.mutant_step(m))
    assert len(res.violation.trace) == 2  # attach, then detach
    text = checker.format_result(res)
    assert "VIOLATION: after CHANNEL_DETACH" in text
    assert "1. A: CHANNEL_ATTACH(channel_id=0, flags=0) = 0xd0000000" in text
    assert "2. A: CHANNEL_DETACH(channel_id=0) = 0" in text


def test_exception_in_step_is_a_violation():
    def raising(state, caller, nr, args, memory_reader=None):
        if nr == abi.DOORBELL:
            raise KeyError("boom")
        return monitor.step(state, caller, nr, args)

    res = checker.check(step_fn=raising)
    assert not res.ok and "raised KeyError" in res.violation.message


def test_undocumented_error_is_a_violation():
    def wrong(state, caller, nr, args, memory_reader=None):
        r = monitor.step(state, caller, nr, args)
        if nr == abi.CONSOLE_WRITE and r.result == -abi.EFAULT:
            return monitor.StepResult(r.state, -abi.EPERM)
        return r

    res = checker.check(step_fn=wrong)
    assert "not a documented error" in res.violation.message


def test_bad_layout_is_reported():
    parts = monitor.MonitorState.from_config(checker.default_config()).topology.partitions
    win = monitor.layout.CHANNEL_WINDOW_START

    def layout_of(*slots):
        chans = tuple(
            monitor.Channel(i, f"x{i}", 0x2000, g, {0: True}) for i, g in enumerate(slots)
        )
        return checker.check_layout(monitor.Topology(parts, chans))

    assert "outside the channel window" in layout_of(0x1000)
    assert "channel x0 at 0xd0000000..0xd0002000 overlaps channel x1" in layout_of(
        win, win + 0x1000
    )
    assert layout_of(win, win + 0x2000) is None


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    command.add_verify_parser(parser.add_subparsers())
    args = parser.parse_args(["verify", *argv])
    return args.func(args)


def test_verify_command(capsys):
    assert run_cli("--depth", "2") == 0
    out = capsys.readouterr().out
    assert "all invariants hold" in out and "states explored:" in out
    assert run_cli("--mutant", "privilege-inverted") == 1
    out = capsys.readouterr().out
    # The document's table finds it first: A, privileged, may stop B.
    assert "VIOLATION: PARTITION_CONTROL returned -EPERM; docs/hypercalls.md prescribes 0" in out
    assert "1. A: PARTITION_CONTROL(target_partition_id=1, op=STOP) = -EPERM" in out
    assert run_cli("--mutant", "list") == 0
    for bad in (["--mutant", "nope"], ["--partitions", "2"], ["--depth", "0"]):
        with pytest.raises(ConfigError):
            run_cli(*bad)
