"""The control protocol over a real Unix socket, against a scripted supervisor
(no /dev/kvm): framing, errors, stale sockets, console streaming."""

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

from osvmm.errors import ConfigError
from osvmm.up.consoles import ConsoleHub
from osvmm.up.protocol import ControlError, connect, exchange, request
from osvmm.up.server import ControlServer


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
            raise ConfigError(f"no partition named {name!r} (partitions: a)")
        return self.partitions[name]

    def describe(self, entry):
        return {"name": entry.name, "state": entry.state}

    def stop(self, name):
        self.calls.append(("stop", name))
        self.entry(name).state = "stopped"
        return "stopped"

    def start(self, name):
        raise ConfigError(f"partition {name!r} is already running")

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
    reply = request(srv.path, {"cmd": "ps"})
    assert reply["ok"] and reply["pid"] == os.getpid() and reply["version"] == 1
    assert reply["partitions"] == [{"name": "a", "state": "running"}]
    assert request(srv.path, {"cmd": "stop", "name": "a"})["state"] == "stopped"
    assert sup.calls == [("stop", "a")]
    assert request(srv.path, {"cmd": "stat"})["partitions"][0]["name"] == "a"
    assert request(srv.path, {"cmd": "down"}) == {"ok": True}
    time.sleep(0.05)
    assert downs == [1]


def test_errors_are_answers_and_the_connection_stays_open(server):
    srv, _, _ = server
    with connect(srv.path) as sock:
        sock.sendall(b"not json\n")
        buf = b""
        while not buf.endswith(b"\n"):
            buf += sock.recv(4096)
        assert json.loads(buf) == {"ok": False, "error": "a request is one JSON object per line"}
        with pytest.raises(ControlError, match=r"^unknown command 'dance' \(ps, start"):
            exchange(sock, {"cmd": "dance"})
        with pytest.raises(ControlError, match="^stop: needs a partition name$"):
            exchange(sock, {"cmd": "stop"})
        with pytest.raises(ControlError, match="^no partition named 'b' "):
            exchange(sock, {"cmd": "stop", "name": "b"})
        with pytest.raises(ControlError, match="already running"):
            exchange(sock, {"cmd": "start", "name": "a"})
        assert exchange(sock, {"cmd": "ps"})["ok"]  # still usable


def test_no_listener_and_stale_or_foreign_paths():
    d = tempfile.mkdtemp(prefix="osvmm-c-", dir="/tmp")
    try:
        path = os.path.join(d, "s")
        with pytest.raises(ControlError, match=f"^no VMM is listening on {path}: start one"):
            request(path, {"cmd": "ps"})
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # a socket file nobody listens on
        with pytest.raises(ControlError, match="no VMM is listening"):
            request(path, {"cmd": "ps"})
        srv = ControlServer(path, FakeSupervisor(), on_down=lambda: None)
        srv.open()  # replaces the stale file
        srv.start()
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


def test_console_replays_history_streams_and_takes_input(server):
    srv, sup, _ = server
    hub = sup.partitions["a"].console
    hub.write(b"before attach\n")
    with connect(srv.path, timeout=5) as sock:
        buf = bytearray()
        reply = exchange(sock, {"cmd": "console", "name": "a"}, buf)
        assert reply["name"] == "a"
        got = bytes(buf)
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


def _answer(sock: socket.socket) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "the VMM closed the connection without an answer"
        buf += chunk
    return json.loads(buf)


@pytest.mark.parametrize(
    "line, error",
    [
        (b'{"cmd":"stat","name":[1]}', "stat: name must be a string or null, not an array"),
        (b'{"cmd":"stop","name":{"a":1}}', "stop: name must be a string, not an object"),
        (b'{"cmd":"start","name":7}', "start: name must be a string, not a number"),
        (b'{"cmd":"console","name":null}', "console: name must be a string, not null"),
        (b'{"cmd":["ps"]}', 'a request needs "cmd", a string (ps, start, stop, restart, stat, '),
        (b'{"name":"a"}', 'a request needs "cmd", a string'),
        (b'{"cmd":"ps","extra":1}', "ps: unknown field 'extra' (fields: none)"),
        (b'{"cmd":"stop","name":"a","force":true}', "stop: unknown field 'force' (fields: name)"),
        (b"[" * 30000 + b"]" * 30000, "a request is one JSON object per line"),
        (b'{"cmd":' * 5000 + b"1" + b"}" * 5000, "a request is one JSON object per line"),
        (b'{"cmd":"\xff\xfe"}', "a request is one JSON object per line"),
        (b'{"cmd":"ps","n":' + b"9" * 5000 + b"}", "a request is one JSON object per line"),
        (b'{"cmd":"stop","name":"' + b"x" * 100 + b'"}', "stop: name 'xxxx"),
    ],
    ids=lambda v: v[:24].decode("latin-1") if isinstance(v, bytes) else None,
)
def test_a_request_of_the_wrong_shape_is_answered_in_one_line(server, line, error):
    srv, sup, _ = server
    with connect(srv.path, timeout=10) as sock:
        sock.sendall(line + b"\n")
        reply = _answer(sock)
        assert reply["ok"] is False and reply["error"].startswith(error), reply
        assert "\n" not in reply["error"] and len(reply["error"]) < 200
        assert exchange(sock, {"cmd": "ps"})["ok"]  # the connection still serves
    assert sup.calls == []


def test_a_line_over_the_limit_is_answered_then_closed(server):
    srv, _, _ = server
    with connect(srv.path, timeout=10) as sock:
        try:
            sock.sendall(b"x" * (200 << 10))
        except OSError:
            pass
        assert _answer(sock) == {"ok": False, "error": "a request line over 65536 bytes"}
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:  # closed with our unread bytes in it
            pass
    assert request(srv.path, {"cmd": "ps"})["ok"]


def test_a_bug_in_a_handler_is_one_line_and_logged(server):
    srv, sup, _ = server
    logged = []
    sup.log = logged.append
    sup.stats = lambda entry: 1 / 0
    with pytest.raises(ControlError, match=r"^internal error in the VMM \(answering stat\): Zero"):
        request(srv.path, {"cmd": "stat"})
    assert "Traceback" in logged[1]
    assert request(srv.path, {"cmd": "ps"})["ok"]


def test_many_clients_at_once_are_all_answered(server):
    srv, _, _ = server
    errors, answers = [], []
    gate = threading.Barrier(200)

    def one():
        gate.wait()
        try:
            answers.append(request(srv.path, {"cmd": "ps"}, timeout=30)["ok"])
        except ControlError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and answers == [True] * 200


def test_idle_clients_are_timed_out_and_do_not_hold_the_server(server, monkeypatch):
    from osvmm.up import server as server_module

    srv, _, _ = server
    monkeypatch.setattr(server_module, "IDLE_TIMEOUT_S", 0.5)
    idle = [connect(srv.path, timeout=10) for _ in range(server_module.MAX_CONNECTIONS)]
    slow = idle[0]
    slow.sendall(b'{"cmd":')  # half a request, never finished
    try:
        for sock in idle:
            assert sock.recv(1) == b""  # closed by the VMM after the idle time
        assert request(srv.path, {"cmd": "ps"})["ok"]
    finally:
        for sock in idle:
            sock.close()


def test_one_connection_over_the_limit_is_refused_in_one_line(server):
    from osvmm.up.server import MAX_CONNECTIONS

    srv, _, _ = server
    held = [connect(srv.path, timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:  # each is being served
            assert exchange(sock, {"cmd": "ps"})["ok"]
        with pytest.raises(ControlError, match=f"^the VMM serves at most {MAX_CONNECTIONS} "):
            request(srv.path, {"cmd": "ps"})
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            assert request(srv.path, {"cmd": "ps"})["ok"]
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
                conn.sendall(b'{"ok": true, "partitions": []}\n')
                time.sleep(2)
            finally:
                os._exit(0)
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        with pytest.raises(ControlError, match=f"is served by uid {NOBODY}, not by you or root"):
            request(path, {"cmd": "ps"})
        os.waitpid(pid, 0)
        os.unlink(path)
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        os.chown(path, NOBODY, NOBODY)
        with pytest.raises(ControlError, match=f"belongs to uid {NOBODY}, not to you or root"):
            request(path, {"cmd": "ps"})
        s.close()
    finally:
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
                s.sendall(b'{"cmd":"stop","name":"a"}\n')
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
    assert answer.startswith(b"{"), answer
    assert json.loads(answer) == {
        "ok": False,
        "error": f"uid {NOBODY} may not use this VMM (it runs as uid 0)",
    }
    assert sup.calls == []


@pytest.mark.parametrize("answer", [b"[1]\n", b'{"error": "x"}\n', b'{"ok": false, "error": 5}\n'])
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
        with pytest.raises(ControlError, match="^the VMM (sent a malformed answer|refused)"):
            request(path, {"cmd": "ps"})
    finally:
        srv.close()
        shutil.rmtree(d, ignore_errors=True)
