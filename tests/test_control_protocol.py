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
        with pytest.raises(ControlError, match="a VMM is already listening on"):
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
