"""docs/hypercalls.md and the ABI table in osvmm/hypercall/abi.py agree."""

from __future__ import annotations

import re
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


def test_every_handler_exists_and_errors_are_known():
    for call in abi.HYPERCALLS:
        assert callable(getattr(monitor, call.handler))
        assert call.errors <= set(abi.ERROR_NAMES)
        assert not call.errors & abi.DISPATCH_ERRORS
    assert set(monitor._HANDLERS) == set(abi.BY_NUMBER)


def test_result_encoding_round_trips():
    for r in (0, 1, 0xD000_0000, (1 << 63) - 1, -abi.EINVAL, -abi.ENOSYS):
        assert abi.decode_result(abi.encode_result(r)) == r
    assert abi.encode_result(-abi.EINVAL) == (1 << 64) - 22
    assert abi.result_name(-abi.EPERM) == "-EPERM"
