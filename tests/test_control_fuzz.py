"""Fuzzing the control API: thousands of random and mutated HTTP requests
(mangled request lines and headers, wrong JSON types, deep nesting, huge
bodies and numbers, invalid UTF-8, control bytes) each get well-formed HTTP
answers with a one-line JSON error (or none, for a request cut short), no
connection thread dies, and the VMM serves as before (in-process against a
scripted supervisor; and against a real ``osvmm up``, whose logs then hold no
traceback)."""

from __future__ import annotations

import json
import random
import socket
import threading

import pytest

from osvmm.up.http import MAX_BODY
from osvmm.up.protocol import call
from tests.test_control_protocol import FakeSupervisor, server  # noqa: F401 - a fixture

SEEDS = [
    ("GET", "/v1/vmm", None),
    ("GET", "/v1/stat", None),
    ("GET", "/v1/partitions", None),
    ("GET", "/v1/partitions/a", None),
    ("GET", "/v1/partitions/a/stat", None),
    ("POST", "/v1/partitions/nosuch/stop", None),
    ("POST", "/v1/partitions/a/start", b"{}"),
    ("POST", "/v1/partitions/zz/restart", None),
    ("GET", "/v1/partitions/a/violations?last=3", None),
    ("POST", "/v1/partitions/nosuch/snapshot", b'{"dir": "/nonexistent/x"}'),
    ("POST", "/v1/partitions/nosuch/protection", b'{"arm": false}'),
    ("POST", "/v1/partitions/nosuch/console", None),
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
ODD_BODIES = [
    b"[" * 20000 + b"]" * 20000,
    b'{"dir":' * 3000 + b'"x"' + b"}" * 3000,
    b'{"dir":' + b"9" * 6000 + b"}",
    b'{"dir":"\xff\xfe\xc3("}',
    b"\xef\xbb\xbf" + b'{"dir":"/x"}',
    b'{"dir":"/x"',
    b'{"dir":"/x"}{"dir":"/y"}',
    b"null",
    b"NaN",
    b'{"dir":NaN}',
    b'{"dir":"/x","dir":[]}',
    b"\x00\x01\x02",
    b" " * 1000,
    b"x" * (MAX_BODY + 10),
]
ODD_HEADS = [
    b"GET /v1/vmm HTTP/1.1\r\n" + b"X: y\r\n" * 200,
    b"GET /v1/vmm HTTP/1.1\r\nX: " + b"y" * 20000,
    b"GET /v1/vmm HTTP/9.9",
    b"GET /v1/vmm",
    b"\r\n\r\n",
    b"GET http://x/v1/vmm HTTP/1.1",
    b"POST /v1/partitions/a/stop HTTP/1.1\r\nTransfer-Encoding: chunked",
    b"POST /v1/partitions/a/stop HTTP/1.1\r\nContent-Length: 99999999999999999999",
    b"POST /v1/partitions/a/stop HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5",
    b"GET /v1/partitions/%zz HTTP/1.1",
    b"GET /v1/partitions/a%00b HTTP/1.1",
    b"GET /v1/partitions/a/violations?last=-1&since=x HTTP/1.1",
    b"GET /v1/partitions/a/violations?last=99999999999999999999999 HTTP/1.1",
    b"GET /v1/vmm?%ff=1 HTTP/1.1",
    b"GET //// HTTP/1.1",
    b"GET /v1/partitions/a/console HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket",
]


def request_bytes(method: str, target: str, body: bytes | None) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: osvmm\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def mutated(rng: random.Random) -> bytes:
    """One request's bytes (framed or not: a request cut short gets no answer)."""
    kind = rng.random()
    method, target, body = rng.choice(SEEDS)
    if kind < 0.05:
        return rng.choice(ODD_HEADS) + b"\r\n\r\n"
    if kind < 0.12:
        return request_bytes("POST", "/v1/partitions/a/stop", rng.choice(ODD_BODIES))
    if kind < 0.35:
        msg = json.loads(body) if body else {}
        key = rng.choice(["dir", "name", "arm", "extra", "", "\u00e9"])
        msg[key] = rng.choice(ODD_VALUES)
        return request_bytes(
            "POST" if rng.random() < 0.8 else method, target, json.dumps(msg).encode()
        )
    if kind < 0.45:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + b"\r\n\r\n"
    data = bytearray(request_bytes(method, target, body))
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip a byte
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:  # insert bytes
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif op == 2:  # delete a run
            del data[pos : pos + rng.randrange(1, 8)]
        elif op == 3:  # repeat a run
            data[pos:pos] = data[pos : pos + rng.randrange(1, 16)] * rng.randrange(1, 50)
        else:  # a structural character
            data[pos:pos] = rng.choice([b"{", b"}", b"[", b"]", b'"', b":", b"\r\n", b" ", b"%"])
    return bytes(data)


def excluded(data: bytes) -> bool:
    """Requests the fuzzer does not send: ending the VMM, handing it over."""
    return b"down" in data or b"handover" in data


def answers(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """Every response in ``raw`` (what a connection carried until the VMM closed it),
    each checked to be well-formed HTTP/1.1 with a JSON body."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"a response cut short: {raw[:200]!r}"
        lines = head.decode("ascii").split("\r\n")
        version, status, _reason = lines[0].split(" ", 2)
        assert version == "HTTP/1.1" and status.isdigit(), lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(": ")
            headers[name.lower()] = value
        if status == "101":
            return [*out, (101, headers, rest)]
        length = int(headers["content-length"])
        body, raw = rest[:length], rest[length:]
        assert len(body) == length, "a body shorter than its Content-Length"
        assert headers["content-type"] == "application/json", headers
        out.append((int(status), headers, json.loads(body)))
    return out


def fuzz(path: str, count: int, seed: int) -> dict:
    """Send ``count`` fuzzed requests, each on a connection of its own, then read
    what the VMM answers until it closes it; check each answer; their tally."""
    rng = random.Random(seed)
    tally = {"2xx": 0, "4xx": 0, "5xx": 0, "500": 0, "none": 0, "closed": 0}
    for _ in range(count):
        data = mutated(rng)
        if excluded(data):
            continue
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(path)
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)  # no more: the VMM answers what it has, closes
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed for a request over a limit: its answer is read below
            raw = b""
            try:
                while chunk := sock.recv(65536):
                    raw += chunk
            except ConnectionResetError:
                pass
        replies = answers(raw)
        if not replies:
            tally["none"] += 1  # cut short: the client went away mid-request
        for status, headers, answer in replies:
            if status == 101:
                continue
            tally[f"{status // 100}xx"] += 1
            tally["500"] += status == 500  # a bug in the VMM
            if status >= 400:
                assert list(answer) == ["error"], answer
                error = answer["error"]
                assert isinstance(error, str) and "\n" not in error and len(error) < 300, error
                assert "internal error" not in error, (data[:200], error)
            if headers.get("connection") == "close":
                tally["closed"] += 1
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
    assert tally["2xx"] > 10 and tally["4xx"] > 1000 and tally["500"] == 0, tally
    assert tally["closed"] > 10 and tally["none"] > 0, tally
    assert logged == [] and died == [] and downs == []
    assert call(srv.path, "GET", "/v1/vmm")["version"] == 1


@pytest.mark.kvm
def test_a_running_vmm_survives_fuzzed_requests():
    from tests.test_supervisor_up import PLAN, UpProcess

    up = UpProcess(PLAN.replace('name = "hello"', 'name = "a"'))
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        tally = fuzz(up.sock, 3000, seed=2)
        assert tally["4xx"] > 1000 and tally["500"] == 0, tally
        parts = up.ps()
        assert parts["counter"]["state"] == "running" and parts["counter"]["boots"] == 1
        assert up.cli("down").returncode == 0
        assert up.proc.wait(30) == 0
        log = (up.logs / "osvmm.log").read_text()
        assert "Traceback" not in log and "internal error" not in log, log
    finally:
        status, _, err = up.close()
    assert status == 0 and "Traceback" not in err and "internal error" not in err, err
