"""Fuzzing the control protocol: thousands of random and mutated request lines
(wrong JSON types, deep nesting, huge lines and numbers, invalid UTF-8, control
bytes) each get one well-formed one-line answer, no connection thread dies,
and the VMM serves as before (in-process against a scripted supervisor; and
against a real ``osvmm up``, whose logs then hold no traceback)."""

from __future__ import annotations

import json
import random
import socket
import threading

import pytest

from osvmm.up.protocol import MAX_LINE, request
from tests.test_control_protocol import FakeSupervisor, server  # noqa: F401 - a fixture

SEEDS = [
    {"cmd": "ps"},
    {"cmd": "stat"},
    {"cmd": "stat", "name": "a"},
    {"cmd": "stat", "name": None},
    {"cmd": "stop", "name": "nosuch"},
    {"cmd": "start", "name": "a"},
    {"cmd": "restart", "name": "zz"},
    {"cmd": "console", "name": "nosuch"},
]
ODD_VALUES = [
    [1],
    {},
    {"a": [{}]},
    1.5,
    -1,
    10**30,
    None,
    True,
    "",
    "\u0000",
    "\ud800",
    "x" * 5000,
    [[[[[]]]]],
]
ODD_LINES = [
    b"[" * 20000 + b"]" * 20000,
    b'{"cmd":' * 3000 + b'"ps"' + b"}" * 3000,
    b'{"cmd":"ps","n":' + b"9" * 6000 + b"}",
    b'{"cmd":"\xff\xfe\xc3("}',
    b"\xef\xbb\xbf" + b'{"cmd":"ps"}',
    b'{"cmd":"ps"',
    b'{"cmd":"ps"}{"cmd":"ps"}',
    b'"cmd"',
    b"null",
    b"NaN",
    b'{"cmd":NaN}',
    b'{"cmd":"ps","cmd":"stop"}',
    b'{"cmd":"stat","name":"a","name":[]}',
    b"\x00\x01\x02",
    b"",
    b" " * 1000,
    b"x" * (MAX_LINE + 10),
]


def mutated(rng: random.Random) -> bytes:
    """One request line (no newline inside it)."""
    kind = rng.random()
    if kind < 0.1:
        line = rng.choice(ODD_LINES)
    elif kind < 0.35:
        msg = dict(rng.choice(SEEDS))
        key = rng.choice(["cmd", "name", "extra", "", "\u00e9"])
        msg[key] = rng.choice(ODD_VALUES)
        line = json.dumps(msg).encode()
    elif kind < 0.45:
        line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    else:
        line = bytearray(json.dumps(rng.choice(SEEDS)).encode())
        for _ in range(rng.randrange(1, 6)):
            op = rng.randrange(5)
            pos = rng.randrange(len(line) + 1)
            if op == 0 and line:  # flip a byte
                line[min(pos, len(line) - 1)] = rng.randrange(256)
            elif op == 1:  # insert bytes
                line[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
            elif op == 2:  # delete a run
                del line[pos : pos + rng.randrange(1, 8)]
            elif op == 3:  # repeat a run
                line[pos:pos] = line[pos : pos + rng.randrange(1, 16)] * rng.randrange(1, 50)
            else:  # a structural character
                line[pos:pos] = rng.choice([b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\"])
        line = bytes(line)
    return line.replace(b"\n", b" ")


def is_down(line: bytes) -> bool:
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(msg, dict) and msg.get("cmd") == "down"


def read_reply(sock: socket.socket, buf: bytearray) -> bytes | None:
    while b"\n" not in buf:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


def fuzz(path: str, count: int, seed: int) -> dict:
    """Send ``count`` fuzzed lines; check each answer; the tally of answers."""
    rng = random.Random(seed)
    tally = {"ok": 0, "error": 0, "closed": 0}
    sock, buf = None, bytearray()
    for _ in range(count):
        line = mutated(rng)
        if is_down(line):
            continue
        if sock is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            sock.connect(path)
            buf = bytearray()
        try:
            sock.sendall(line + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed for a line over the limit: its answer is read below
        reply = read_reply(sock, buf)
        assert reply is not None, f"no answer to {line[:80]!r}"
        answer = json.loads(reply)
        assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), reply[:200]
        if answer["ok"]:
            tally["ok"] += 1
        else:
            tally["error"] += 1
            error = answer["error"]
            assert isinstance(error, str) and "\n" not in error and len(error) < 300, error
            assert "internal error" not in error, (line[:200], error)
        if len(line) > MAX_LINE or (answer["ok"] and b"console" in line):
            sock.close()  # closed by the VMM, or now a console stream
            sock = None
            tally["closed"] += 1
    if sock is not None:
        sock.close()
    return tally


def test_fuzzed_requests_are_each_answered_in_one_line(server):  # noqa: F811
    srv, sup, downs = server
    logged, died = [], []
    sup.log = logged.append
    old_hook = threading.excepthook
    threading.excepthook = died.append
    try:
        tally = fuzz(srv.path, 3000, seed=1)
    finally:
        threading.excepthook = old_hook
    assert tally["ok"] > 10 and tally["error"] > 1000 and tally["closed"] > 0, tally
    assert logged == [] and died == [] and downs == []
    assert request(srv.path, {"cmd": "ps"})["ok"]


@pytest.mark.kvm
def test_a_running_vmm_survives_fuzzed_requests():
    from tests.test_supervisor_up import PLAN, UpProcess

    up = UpProcess(PLAN.replace('name = "hello"', 'name = "a"'))
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        tally = fuzz(up.sock, 3000, seed=2)
        assert tally["error"] > 1000, tally
        parts = up.ps()
        assert parts["counter"]["state"] == "running" and parts["counter"]["boots"] == 1
        assert up.cli("down").returncode == 0
        assert up.proc.wait(30) == 0
        log = (up.logs / "osvmm.log").read_text()
        assert "Traceback" not in log and "internal error" not in log, log
    finally:
        status, _, err = up.close()
    assert status == 0 and "Traceback" not in err and "internal error" not in err, err
