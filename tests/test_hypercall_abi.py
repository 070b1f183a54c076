"""docs/hypercalls.md, the ABI table in osvmm/hypercall/abi.py and the dispatcher agree."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from osvmm.hypercall import abi, monitor

DOC = Path(__file__).resolve().parent.parent / "docs" / "hypercalls.md"
HEADING = re.compile(r"^### (\d+) ([A-Z_]+)\(([^)]*)\)\s*$")


def doc_sections() -> dict[int, tuple[str, tuple[str, ...], str]]:
    """nr -> (name, argument names, the section's text) from the call headings."""
    sections: dict[int, tuple[str, tuple[str, ...], str]] = {}
    current = None
    body: list[str] = []
    for line in DOC.read_text().splitlines() + ["## end"]:
        m = HEADING.match(line)
        if m or line.startswith("## ") or line.startswith("### "):
            if current is not None:
                nr, name, args = current
                assert nr not in sections, f"call {nr} documented twice"
                sections[nr] = (name, args, "\n".join(body))
            current, body = None, []
            if m:
                args = tuple(a.strip() for a in m.group(3).split(",") if a.strip())
                current = (int(m.group(1)), m.group(2), args)
            continue
        body.append(line)
    return sections


def documented_errors(text: str) -> set[str]:
    """Error names in the rows of a section's error table (`| -EINVAL | ...`)."""
    return set(re.findall(r"^\| -(E[A-Z]+) \|", text, flags=re.M))


def test_doc_lists_exactly_the_six_calls():
    sections = doc_sections()
    assert sorted(sections) == [c.nr for c in abi.HYPERCALLS] == list(range(6))
    for call in abi.HYPERCALLS:
        name, args, _ = sections[call.nr]
        assert (name, args) == (call.name, call.args), f"call {call.nr}"


@pytest.mark.parametrize("call", abi.HYPERCALLS, ids=lambda c: c.name)
def test_doc_errors_match_the_table(call):
    _, _, text = doc_sections()[call.nr]
    assert documented_errors(text) == set(call.error_names)


def test_doc_summary_table_matches():
    rows = re.findall(r"^\| (\d) \| ([A-Z_]+) \|(.*)\|$", DOC.read_text(), flags=re.M)
    table = {
        int(nr): (name, tuple(a.strip() for a in rest.split("|") if a.strip()))
        for nr, name, rest in rows
        if name in abi.BY_NAME
    }
    assert table == {c.nr: (c.name, c.args) for c in abi.HYPERCALLS}


def test_doc_states_port_and_errno_values():
    text = DOC.read_text()
    assert f"{abi.HYPERCALL_PORT:#06x}" in text
    for err, name in abi.ERROR_NAMES.items():
        assert f"{name} {err}" in text, name
    assert documented_errors(text.split("## Concepts")[0]) == {
        abi.ERROR_NAMES[e] for e in abi.DISPATCH_ERRORS
    }


def test_errors_are_known_and_not_the_dispatchers():
    for call in abi.HYPERCALLS:
        assert call.errors <= set(abi.ERROR_NAMES)
        assert not call.errors & abi.DISPATCH_ERRORS


def doc_call_table() -> list[tuple[int, str, tuple[str, ...]]]:
    """(nr, name, argument names) of each row of the "## Calls" summary table."""
    text = DOC.read_text().split("## Calls", 1)[1].split("\n\n")[1]
    rows = []
    for line in text.splitlines()[2:]:  # after the header and the --- row
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append((int(cells[0]), cells[1], tuple(c for c in cells[2:] if c)))
    return rows


# For each documented call: arguments that make it succeed from probe_state(), and
# the one effect that only that call has (docs/hypercalls.md, each call's section).
PROBES = {
    "PARTITION_INFO": ((0x1000, 0x1000), monitor.WriteGuest),
    "CONSOLE_WRITE": ((0x1000, 3), monitor.ConsoleWrite),
    "DOORBELL": ((0, 0, abi.VECTOR_MIN), monitor.RaiseInterrupt),
    "CHANNEL_ATTACH": ((1, 0), monitor.MapChannel),
    "CHANNEL_DETACH": ((0,), monitor.UnmapChannel),
    "PARTITION_CONTROL": ((1, abi.ControlOp.STOP), monitor.PartitionLifecycle),
}


def probe_state() -> monitor.MonitorState:
    """Caller 0 (privileged, 2 MiB) has channel 0 attached and channel 1 not."""
    ram = [(0, 2 * 1024 * 1024)]
    members = {"a": "rw"}
    fresh = monitor.MonitorState.from_config(
        monitor.MonitorConfig(
            [monitor.PartitionConfig("a", ram, privileged=True), monitor.PartitionConfig("b", ram)],
            [
                monitor.ChannelConfig("c0", 0x1000, members),
                monitor.ChannelConfig("c1", 0x1000, members),
            ],
        )
    )
    return replace(fresh, attachments=frozenset({monitor.Attachment(0, 0, True)}))


def test_each_documented_number_dispatches_to_its_call():
    """Dispatching each number of the doc's table runs the call the doc names there,
    with the documented arguments; the arguments it does not take are ignored."""
    rows = doc_call_table()
    assert sorted(name for _, name, _ in rows) == sorted(PROBES)
    state = probe_state()
    for nr, name, args in rows:
        probe, effect = PROBES[name]
        assert len(probe) == len(args), name
        r = monitor.step(state, 0, nr, probe)
        assert r.result >= 0 and [type(e) for e in r.effects] == [effect], (nr, name, r)
        unused = (abi.U64_MAX,) * (abi.NUM_ARGS - len(args))
        again = monitor.step(state, 0, nr, (*probe, *unused))
        assert (again.result, again.effects) == (r.result, r.effects), (nr, name)
    documented = {nr for nr, _, _ in rows}
    for nr in (max(documented) + 1, 0xFFFF_FFFF):
        assert monitor.step(state, 0, nr, ()).result == -abi.ENOSYS


def test_result_encoding_round_trips():
    for r in (0, 1, 0xD000_0000, (1 << 63) - 1, -abi.EINVAL, -abi.ENOSYS):
        assert abi.decode_result(abi.encode_result(r)) == r
    assert abi.encode_result(-abi.EINVAL) == (1 << 64) - 22
    assert abi.result_name(-abi.EPERM) == "-EPERM"
