"""The control API over a real Unix socket, against a scripted supervisor
(no /dev/kvm): HTTP framing and its limits, routes, errors and their statuses,
stale sockets, console streaming through an upgrade. The requests are made with
http.client (tests/helpers.py), osvmm's own client where it is under test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from types import SimpleNamespace

import pytest

from osvmm.errors import NoSuchPartition, WrongState
from osvmm.up.consoles import ConsoleHub
from osvmm.up.http import MAX_BODY, MAX_HEAD
from osvmm.up.protocol import ControlError, attach, call, connect, exchange
from osvmm.up.server import ControlServer
from tests.helpers import UnixHTTPConnection, api


class FakeSupervisor:
    def __init__(self):
        self.calls = []
        self.plan = SimpleNamespace(source="plan.toml")
        self.log_dir = None
        hub = ConsoleHub("a", None, None)
        self.serial_in = bytearray()
        serial = SimpleNamespace(enqueue=self._enqueue)
        self.partitions = {
            "a": SimpleNamespace(
                name="a",
                state="running",
                reason="",
                console=hub,
                partition=SimpleNamespace(serial=serial),
            )
        }

    def _enqueue(self, data: bytes) -> int:
        self.serial_in += data
        return len(data)

    def entry(self, name):
        if name not in self.partitions:
            raise NoSuchPartition(f"no partition named {name!r} (partitions: a)")
        return self.partitions[name]

    def describe(self, entry):
        return {"name": entry.name, "state": entry.state}

    def stop(self, name):
        if self.entry(name).state != "running":
            raise WrongState(f"partition {name!r} is not running (stopped)")
        self.calls.append(("stop", name))
        self.entry(name).state = "stopped"
        return "stopped"

    def start(self, name):
        raise WrongState(f"partition {name!r} is already running")

    restart = stop

    def stats(self, entry):
        return {"name": entry.name, "live": True, "vcpus": [], "unclaimed_ports": {}}


@pytest.fixture
def server():
    d = tempfile.mkdtemp(prefix="osvmm-c-", dir="/tmp")
    sup = FakeSupervisor()
    downs = []
    srv = ControlServer(os.path.join(d, "s"), sup, on_down=lambda: downs.append(1))
    srv.open()
    srv.start()
    yield srv, sup, downs
    srv.close()
    shutil.rmtree(d, ignore_errors=True)


def test_requests_and_answers(server):
    srv, sup, downs = server
    status, headers, reply = api(srv.path, "GET", "/v1/vmm")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert reply["pid"] == os.getpid() and reply["version"] == 1
    assert reply["partitions"] == [{"name": "a", "state": "running"}]
    assert api(srv.path, "GET", "/v1/partitions")[2] == {"partitions": reply["partitions"]}
    assert api(srv.path, "GET", "/v1/partitions/a")[2] == {"name": "a", "state": "running"}
    assert api(srv.path, "POST", "/v1/partitions/a/stop")[2]["state"] == "stopped"
    assert sup.calls == [("stop", "a")]
    assert api(srv.path, "GET", "/v1/stat")[2]["partitions"][0]["name"] == "a"
    assert api(srv.path, "GET", "/v1/partitions/a/stat")[2]["name"] == "a"
    assert call(srv.path, "POST", "/v1/down") == {}
    time.sleep(0.05)
    assert downs == [1]


@pytest.mark.parametrize(
    "method, target, body, status, error",
    [
        ("GET", "/v1/dance", None, 404, "no route '/v1/dance' (docs/openapi.yaml lists them)"),
        ("GET", "/", None, 404, "no route '/'"),
        ("GET", "/v1/partitions/b", None, 404, "no partition named 'b' (partitions: a)"),
        ("POST", "/v1/partitions/b/stop", None, 404, "no partition named 'b'"),
        ("POST", "/v1/partitions/a/start", None, 409, "partition 'a' is already running"),
        ("PUT", "/v1/partitions/a", None, 405, "/v1/partitions/a takes GET, not 'PUT'"),
        ("GET", "/v1/down", None, 405, "/v1/down takes POST, not 'GET'"),
        ("POST", "/v1/partitions/a/stop", b"not json", 400, "stopPartition: a request body is"),
        ("POST", "/v1/partitions/a/stop", b"[1]", 400, "stopPartition: a request body is one"),
        ("POST", "/v1/partitions/a/stop", {"force": True}, 400, "stopPartition: unknown field"),
        ("GET", "/v1/vmm?x=1", None, 400, "getVmm: unknown parameter 'x' (parameters: none)"),
        ("GET", "/v1/partitions/%ff", None, 400, "getPartition: a partition name is UTF-8"),
        ("GET", "/v1/partitions/" + "x" * 65, None, 400, "getPartition: name 'xxxx"),
    ],
)
def test_errors_have_their_status_and_the_connection_stays_open(
    server, method, target, body, status, error
):
    srv, sup, _ = server
    conn = UnixHTTPConnection(srv.path)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body)
        conn.request(method, target, body=data)
        r = conn.getresponse()
        answer = json.loads(r.read())
        assert r.status == status and r.getheader("Content-Type") == "application/json"
        assert list(answer) == ["error"] and answer["error"].startswith(error), answer
        assert "\n" not in answer["error"] and len(answer["error"]) < 200
        if status == 405:
            assert r.getheader("Allow") in ("GET", "POST")
        conn.request("GET", "/v1/vmm")  # the same connection still serves
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["pid"] == os.getpid()
    finally:
        conn.close()
    assert sup.calls == []


def test_the_client_says_the_error_in_one_line(server):
    srv, _, _ = server
    with connect(srv.path) as sock:
        with pytest.raises(ControlError, match="^no partition named 'b' "):
            exchange(sock, "POST", "/v1/partitions/b/stop")
        with pytest.raises(ControlError, match="already running"):
            exchange(sock, "POST", "/v1/partitions/a/start")
        assert exchange(sock, "GET", "/v1/vmm")["pid"] == os.getpid()  # still usable


def test_no_listener_and_stale_or_foreign_paths():
    d = tempfile.mkdtemp(prefix="osvmm-c-", dir="/tmp")
    try:
        path = os.path.join(d, "s")
        with pytest.raises(ControlError, match=f"^no VMM is listening on {path}: start one"):
            call(path, "GET", "/v1/vmm")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # a socket file nobody listens on
        with pytest.raises(ControlError, match="no VMM is listening"):
            call(path, "GET", "/v1/vmm")
        srv = ControlServer(path, FakeSupervisor(), on_down=lambda: None)
        srv.open()  # replaces the stale file
        srv.start()
        assert os.stat(path).st_mode & 0o777 == 0o600
        other = ControlServer(path, FakeSupervisor(), on_down=lambda: None)
        held = rf"^a VMM \(pid {os.getpid()}\) already serves {path} "
        with pytest.raises(ControlError, match=held):
            other.open()
        srv.close()
        assert not os.path.exists(path)
        with open(path, "w") as f:
            f.write("x")
        with pytest.raises(ControlError, match="exists and is not a socket"):
            ControlServer(path, FakeSupervisor(), on_down=lambda: None).open()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_an_unknown_group_is_one_line():
    d = tempfile.mkdtemp(prefix="osvmm-c-", dir="/tmp")
    try:
        srv = ControlServer(os.path.join(d, "s"), FakeSupervisor(), lambda: None, group="no-such")
        with pytest.raises(ControlError, match="^control socket group 'no-such': no such group$"):
            srv.open()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_console_replays_history_streams_and_takes_input(server):
    srv, sup, _ = server
    hub = sup.partitions["a"].console
    hub.write(b"before attach\n")
    sock, first = attach(srv.path, "a", timeout=5)
    with sock:
        got = first
        threading.Timer(0.1, hub.write, args=(b"after\n",)).start()
        while b"after\n" not in got:
            got += sock.recv(4096)
        assert got == b"before attach\nafter\n"
        sock.sendall(b"typed")
        deadline = time.monotonic() + 5
        while bytes(sup.serial_in) != b"typed":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    deadline = time.monotonic() + 5
    while hub._clients:  # detached when the client closed
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_upgrade_answer_and_bytes_sent_with_the_request(server):
    srv, sup, _ = server
    with connect(srv.path, timeout=5) as sock:
        sock.sendall(
            b"POST /v1/partitions/a/console HTTP/1.1\r\nHost: x\r\n"
            b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\nearly"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 101 Switching Protocols"
        assert {"Upgrade: tcp", "Connection: Upgrade", "Osvmm-State: running"} <= set(lines)
        deadline = time.monotonic() + 5
        while bytes(sup.serial_in) != b"early":  # sent before the answer: not lost
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_a_console_without_the_upgrade_is_refused_and_the_connection_goes_on(server):
    srv, _, _ = server
    with connect(srv.path, timeout=5) as sock:
        with pytest.raises(ControlError, match="^attachConsole: needs Connection: Upgrade and "):
            exchange(sock, "POST", "/v1/partitions/a/console")
        assert exchange(sock, "GET", "/v1/vmm")["version"] == 1
    with pytest.raises(ControlError, match="^no partition named 'zz'"):
        attach(srv.path, "zz")


def _answer(sock: socket.socket, buf: bytearray | None = None) -> tuple[int, dict, bytes]:
    """A response read by hand: status, headers, body (by Content-Length); ``buf``
    keeps what came after it (pipelined answers)."""
    buf = bytearray() if buf is None else buf
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"the VMM closed the connection without an answer: {buf!r}"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(headers["Content-Length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    buf[:] = rest[length:]
    return int(lines[0].split()[1]), headers, rest[:length]


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with our unread bytes in it
        return True


def _post(target: str, body: bytes) -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )


@pytest.mark.parametrize(
    "body, error",
    [
        (b'{"dir":[1]}', "snapshotPartition: dir must be a string, not an array"),
        (b'{"dir":{"a":1}}', "snapshotPartition: dir must be a string, not an object"),
        (b'{"dir":7}', "snapshotPartition: dir must be a string, not a number"),
        (b'{"dir":null}', "snapshotPartition: dir must be a string, not null"),
        (b'{"dir":"/x","stop":1}', "snapshotPartition: stop must be true or false, not a number"),
        (b"{}", "snapshotPartition: needs dir"),
        (b'{"dir":"/x","extra":1}', "snapshotPartition: unknown field 'extra' (fields: dir, stop)"),
        (b"[" * 30000 + b"]" * 30000, "snapshotPartition: a request body is one JSON object"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "snapshotPartition: a request body is one JSON"),
        (b'{"dir":"\xff\xfe"}', "snapshotPartition: a request body is one JSON object"),
        (b'{"dir":' + b"9" * 5000 + b"}", "snapshotPartition: a request body is one JSON object"),
    ],
    ids=lambda v: v[:24].decode("latin-1") if isinstance(v, bytes) else None,
)
def test_a_body_of_the_wrong_shape_is_answered_400_in_one_line(server, body, error):
    from osvmm.up.api import NAME, Route

    srv, sup, _ = server
    done = []
    srv.add_routes(
        [
            Route(
                "POST",
                "/v1/partitions/{name}/snapshot",
                "snapshotPartition",
                done.append,
                {"dir": NAME, "stop": ((bool,), False)},
            )
        ]
    )
    with connect(srv.path, timeout=10) as sock:
        sock.sendall(_post("/v1/partitions/a/snapshot", body))
        status, _, raw = _answer(sock)
        reply = json.loads(raw)
        assert status == 400 and reply["error"].startswith(error), reply
        assert "\n" not in reply["error"] and len(reply["error"]) < 200
        assert exchange(sock, "GET", "/v1/vmm")["version"] == 1  # the connection still serves
    assert sup.calls == [] and done == []


@pytest.mark.parametrize(
    "request_bytes, status, error",
    [
        (b"GET /v1/vmm\r\n\r\n", 400, "a malformed request line"),
        (b"GET  /v1/vmm HTTP/1.1\r\n\r\n", 400, "a malformed request line"),
        (b"G(T /v1/vmm HTTP/1.1\r\n\r\n", 400, "a malformed request line"),
        (b"GET /v1/vmm HTTP/2.0\r\n\r\n", 505, "only HTTP/1.1 and HTTP/1.0 are spoken here"),
        (b"GET v1/vmm HTTP/1.1\r\n\r\n", 400, "a request target is an absolute path"),
        (b"GET /v1/\xffvmm HTTP/1.1\r\n\r\n", 400, "a request target is an absolute path"),
        (b"GET /v1/vmm HTTP/1.1\r\nNo colon\r\n\r\n", 400, "a malformed header field"),
        (b"GET /v1/vmm HTTP/1.1\r\n folded: x\r\n\r\n", 400, "a malformed header field"),
        (b"GET /v1/vmm HTTP/1.1\r\nA: \xe9\r\n\r\n", 400, "a header field that is not ASCII"),
        (
            b"POST /v1/down HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
            "header field content-length given twice",
        ),
        (
            b"POST /v1/down HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            400,
            "Content-Length is not a number",
        ),
        (
            b"POST /v1/down HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n",
            400,
            "Content-Length is not a number",
        ),
        (
            b"POST /v1/down HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
            "a body in a transfer coding: send it with Content-Length",
        ),
        (
            b"POST /v1/down HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
            413,
            f"a request body over {MAX_BODY} bytes",
        ),
        (
            b"GET /v1/vmm HTTP/1.1\r\n" + b"A: b\r\n" * 65 + b"\r\n",
            431,
            "more than 64 header fields",
        ),
        (
            b"GET /v1/vmm HTTP/1.1\r\nA: " + b"b" * MAX_HEAD,
            431,
            f"a request head over {MAX_HEAD} bytes",
        ),
    ],
    ids=lambda v: v[:28].decode("latin-1") if isinstance(v, bytes) else None,
)
def test_a_request_that_is_not_http_is_answered_then_closed(server, request_bytes, status, error):
    srv, _, downs = server
    with connect(srv.path, timeout=10) as sock:
        try:
            sock.sendall(request_bytes)
        except OSError:
            pass
        got, headers, raw = _answer(sock)
        assert (got, json.loads(raw)) == (status, {"error": error})
        assert headers["Connection"] == "close"
        assert _closed(sock)
    assert downs == []
    assert call(srv.path, "GET", "/v1/vmm")["version"] == 1


def test_a_body_over_the_limit_is_answered_then_closed(server):
    srv, _, _ = server
    with connect(srv.path, timeout=10) as sock:
        try:
            sock.sendall(_post("/v1/down", b"x" * (200 << 10)))
        except OSError:
            pass
        status, _, raw = _answer(sock)
        assert (status, json.loads(raw)) == (413, {"error": "a request body over 65536 bytes"})
        assert _closed(sock)
    assert call(srv.path, "GET", "/v1/vmm")["version"] == 1


def test_pipelined_requests_are_answered_in_order_and_connection_close_is_honoured(server):
    srv, _, _ = server
    with connect(srv.path, timeout=10) as sock:
        sock.sendall(
            b"GET /v1/partitions/a HTTP/1.1\r\n\r\nGET /v1/nope HTTP/1.1\r\n\r\n"
            b"GET /v1/partitions HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        buf = bytearray()
        assert _answer(sock, buf)[0] == 200
        assert _answer(sock, buf)[0] == 404
        status, headers, raw = _answer(sock, buf)
        assert status == 200 and headers["Connection"] == "close" and b"partitions" in raw
        assert _closed(sock)
    with connect(srv.path, timeout=10) as sock:  # HTTP/1.0: one request unless kept alive
        sock.sendall(b"GET /v1/vmm HTTP/1.0\r\n\r\n")
        assert _answer(sock)[0] == 200 and _closed(sock)


def test_a_bug_in_a_handler_is_a_500_in_one_line_and_logged(server):
    srv, sup, _ = server
    logged = []
    sup.log = logged.append
    sup.stats = lambda entry: 1 / 0
    status, _, reply = api(srv.path, "GET", "/v1/stat")
    assert status == 500
    assert reply["error"].startswith("internal error in the VMM (answering getStat): Zero")
    assert "Traceback" in logged[1]
    with pytest.raises(
        ControlError, match=r"^internal error in the VMM \(answering getPartitionStat\): Zero"
    ):
        call(srv.path, "GET", "/v1/partitions/a/stat")
    assert call(srv.path, "GET", "/v1/vmm")["version"] == 1


def test_many_clients_at_once_are_all_answered(server):
    srv, _, _ = server
    errors, answers = [], []
    gate = threading.Barrier(200)

    def one():
        gate.wait()
        try:
            answers.append(call(srv.path, "GET", "/v1/vmm", timeout=30)["version"])
        except ControlError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and answers == [1] * 200


def test_idle_clients_are_timed_out_and_do_not_hold_the_server(server, monkeypatch):
    from osvmm.up import server as server_module

    srv, _, _ = server
    monkeypatch.setattr(server_module, "IDLE_TIMEOUT_S", 0.5)
    idle = [connect(srv.path, timeout=10) for _ in range(server_module.MAX_CONNECTIONS)]
    slow = idle[0]
    slow.sendall(b"GET /v1/vmm HTTP/1.1\r\nHost:")  # half a request, never finished
    try:
        status, headers, raw = _answer(slow)
        assert (status, json.loads(raw)) == (408, {"error": "a request not whole in time"})
        for sock in idle:
            assert _closed(sock)  # closed by the VMM after the idle time
        assert call(srv.path, "GET", "/v1/vmm")["version"] == 1
    finally:
        for sock in idle:
            sock.close()


def test_a_client_that_does_not_read_its_answers_holds_no_one_else(server, monkeypatch):
    from osvmm.up import server as server_module

    srv, _, _ = server
    monkeypatch.setattr(server_module, "SEND_TIMEOUT_S", 0.5)
    greedy = connect(srv.path, timeout=10)
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        for _ in range(2000):  # many answers asked for, none read
            greedy.sendall(b"GET /v1/vmm HTTP/1.1\r\n\r\n")
    except OSError:
        pass
    t = time.monotonic()
    assert call(srv.path, "GET", "/v1/vmm", timeout=10)["version"] == 1
    assert time.monotonic() - t < 2
    greedy.close()


def test_one_connection_over_the_limit_is_refused_with_503(server):
    from osvmm.up.server import MAX_CONNECTIONS

    srv, _, _ = server
    held = [connect(srv.path, timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:  # each is being served
            assert exchange(sock, "GET", "/v1/vmm")["version"] == 1
        with connect(srv.path, timeout=10) as sock:
            try:
                sock.sendall(b"GET /v1/vmm HTTP/1.1\r\n\r\n")
            except BrokenPipeError:  # refused before it was sent: the answer waits
                pass
            status, headers, raw = _answer(sock)
        assert status == 503 and headers["Connection"] == "close"
        assert json.loads(raw) == {"error": f"the VMM serves at most {MAX_CONNECTIONS} connections"}
        with pytest.raises(ControlError, match=f"^the VMM serves at most {MAX_CONNECTIONS} "):
            call(srv.path, "GET", "/v1/vmm")
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            assert call(srv.path, "GET", "/v1/vmm")["version"] == 1
            break
        except ControlError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


@as_root
def test_the_client_refuses_a_vmm_of_another_user():
    d = tempfile.mkdtemp(prefix="osvmm-c-", dir="/tmp")
    path = os.path.join(d, "s")
    try:
        pid = os.fork()
        if pid == 0:  # a squatter: the socket file is root's, the listener is not
            try:
                srv = socket.socket(socket.AF_UNIX)
                srv.bind(path)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                srv.listen(4)
                conn, _ = srv.accept()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                time.sleep(2)
            finally:
                os._exit(0)
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        with pytest.raises(ControlError, match=f"is served by uid {NOBODY}, not by you or root"):
            call(path, "GET", "/v1/vmm")
        os.waitpid(pid, 0)
        os.unlink(path)
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        os.chown(path, NOBODY, NOBODY)
        with pytest.raises(ControlError, match=f"belongs to uid {NOBODY}, not to you or root"):
            call(path, "GET", "/v1/vmm")
        s.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


VMM_UID = 23456  # a user of no other test: the VMM's, when it is not root's


def _child(fn) -> tuple[int, int]:
    """Run ``fn()`` in a forked child; (its pid, the read end of what it writes)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, fn().encode())
        except BaseException as e:  # noqa: BLE001 - shown by the assertion that reads it
            os.write(w, f"{type(e).__name__}: {e}".encode())
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def _read(pid: int, r: int) -> str:
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@as_root
def test_a_group_given_the_socket_may_use_it():
    """A VMM of a user that is not root gives its socket to a group (--group):
    a member of that group, another user, is trusted by its client and served."""
    import grp

    gid = grp.getgrnam("nogroup").gr_gid
    d = tempfile.mkdtemp(prefix="osvmm-c-", dir="/tmp")
    os.chmod(d, 0o711)
    run = os.path.join(d, "run")
    os.mkdir(run, 0o700)
    os.chown(run, VMM_UID, VMM_UID)
    path = os.path.join(run, "s")
    ready_r, ready_w = os.pipe()

    def vmm() -> str:
        os.setgroups([gid])
        os.setresgid(VMM_UID, VMM_UID, VMM_UID)
        os.setresuid(VMM_UID, VMM_UID, VMM_UID)
        srv = ControlServer(path, FakeSupervisor(), lambda: None, group="nogroup")
        srv.open()
        srv.start()
        os.write(ready_w, b"x")
        time.sleep(5)
        srv.close()
        return ""

    server_pid, server_out = _child(vmm)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x", _read(server_pid, server_out)
        st, dst = os.stat(path), os.stat(run)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (VMM_UID, gid, 0o660)
        assert (dst.st_gid, dst.st_mode & 0o777) == (gid, 0o710)

        def member() -> str:
            os.setgroups([gid])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            return json.dumps(call(path, "GET", "/v1/vmm"))

        assert json.loads(_read(*_child(member)))["version"] == 1

        def stranger() -> str:  # nobody, in no group of the VMM's (nogroup is 65534 too)
            os.setgroups([])
            os.setresgid(VMM_UID + 1, VMM_UID + 1, VMM_UID + 1)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            try:
                call(path, "GET", "/v1/vmm")
            except ControlError as err:
                return str(err)
            return "served"

        assert _read(*_child(stranger)) == f"cannot connect to {path}: Permission denied"
    finally:
        os.close(ready_r)
        os.kill(server_pid, 9)
        _read(server_pid, server_out)
        shutil.rmtree(d, ignore_errors=True)


@as_root
def test_the_vmm_refuses_a_client_of_another_user(server):
    srv, sup, _ = server
    os.chmod(os.path.dirname(srv.path), 0o755)
    os.chmod(srv.path, 0o666)  # as if the file mode were lost: the credentials still count
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # another user's client
        try:
            os.setresuid(NOBODY, NOBODY, NOBODY)
            s = socket.socket(socket.AF_UNIX)
            s.connect(srv.path)
            try:
                s.sendall(b"POST /v1/partitions/a/stop HTTP/1.1\r\n\r\n")
            except BrokenPipeError:  # refused before it was sent: the answer waits
                pass
            os.write(w, s.recv(4096))
        except BaseException as e:  # noqa: BLE001 - shown by the assertion below
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read()
    os.waitpid(pid, 0)
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n"), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
        "error": f"uid {NOBODY} may not use this VMM (it runs as uid 0)",
    }
    assert sup.calls == []


@pytest.mark.parametrize(
    "answer",
    [
        b"[1]\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[1]",
        b'HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\n{"error":5}',
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{}",
        b"HTTP/1.1 abc OK\r\n\r\n",
    ],
)
def test_a_malformed_answer_is_one_line_for_the_client(answer):
    d = tempfile.mkdtemp(prefix="osvmm-c-", dir="/tmp")
    path = os.path.join(d, "s")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def answer_once():
        conn, _ = srv.accept()
        conn.recv(4096)
        conn.sendall(answer)
        conn.close()

    threading.Thread(target=answer_once, daemon=True).start()
    try:
        with pytest.raises(ControlError, match="^the VMM (sent a malformed answer|refused|closed)"):
            call(path, "GET", "/v1/vmm")
    finally:
        srv.close()
        shutil.rmtree(d, ignore_errors=True)


TOKEN = "0123456789abcdef-not-a-secret"


@pytest.fixture
def tcp_server():
    d = tempfile.mkdtemp(prefix="osvmm-c-", dir="/tmp")
    sup = FakeSupervisor()
    srv = ControlServer(
        os.path.join(d, "s"), sup, lambda: None, listen=("127.0.0.1", 0), token=TOKEN
    )
    srv.open()
    srv.start()
    yield srv, sup
    srv.close()
    shutil.rmtree(d, ignore_errors=True)


def test_the_tcp_listener_serves_only_requests_that_carry_the_token(tcp_server):
    import http.client

    srv, sup = tcp_server
    host, port = srv.tcp_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            conn.request("POST", "/v1/partitions/a/stop", headers=headers)
            r = conn.getresponse()
            answer = json.loads(r.read())
            assert r.status == 401 and r.getheader("WWW-Authenticate") == 'Bearer realm="osvmm"'
            assert answer == {
                "error": "a request on TCP needs Authorization: Bearer TOKEN (the VMM's token)"
            }
        assert sup.calls == []  # none of them acted
        conn.request("POST", "/v1/partitions/a/stop", headers={"Authorization": f"Bearer {TOKEN}"})
        r = conn.getresponse()  # the same connection: refusals do not end it
        assert r.status == 200 and json.loads(r.read())["state"] == "stopped"
        assert sup.calls == [("stop", "a")]
    finally:
        conn.close()
    with socket.create_connection((host, port), timeout=10) as sock:  # the console, on TCP
        sock.sendall(
            b"POST /v1/partitions/a/console HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert os.stat(srv.path).st_mode & 0o777 == 0o600  # the Unix socket as ever


def test_a_tcp_listener_needs_a_token(tmp_path):
    with pytest.raises(ControlError, match="^a TCP listener of the control API needs a token$"):
        ControlServer(str(tmp_path / "s"), FakeSupervisor(), lambda: None, listen=("::1", 0))


@pytest.mark.parametrize(
    "mode, text, error",
    [
        (0o600, None, "--listen and --token-file go together: a TCP API needs a token"),
        (0o644, TOKEN, "readable by others or not yours (mode 0644, uid "),
        (0o600, "short", "the token is one line of at least 16 visible ASCII characters"),
        (0o600, "a token with spaces in it", "the token is one line of at least 16 visible"),
    ],
)
def test_up_refuses_a_tcp_api_without_a_private_token(tmp_path, mode, text, error):
    from tests.helpers import run_osvmm

    args = ["up", str(tmp_path / "plan.toml"), "--listen", "127.0.0.1:9"]
    if text is not None:
        token = tmp_path / "token"
        token.write_text(text + "\n")
        token.chmod(mode)
        args += ["--token-file", str(token)]
    r = run_osvmm(*args)
    assert r.returncode == 2 and r.stderr.startswith(b"osvmm: error: ")
    assert error in r.stderr.decode() and len(r.stderr.splitlines()) == 1, r.stderr
