"""The host side of virtio-vsock (vmm/vsock_uds.py): Firecracker's Unix-socket
protocol against the real model and a guest the test plays (test_virtio_vsock's
Guest): CONNECT and OK, refusal, bad lines, guest connects to PATH_<port>; the
listening socket's checks and its removal."""

from __future__ import annotations

import select
import socket

import pytest

from osvmm.devices.virtio.vsock import FIRST_HOST_PORT, VirtioVsock
from osvmm.errors import ConfigError
from osvmm.vmm.vsock_uds import open_vsock_uds
from tests.test_virtio_vsock import CID, Guest, kinds
from tests.virtio_driver import memory


@pytest.fixture
def bridge(tmp_path):
    path = str(tmp_path / "v.sock")
    backend = open_vsock_uds(path)
    mem = memory(4 << 20)
    model = VirtioVsock(backend, mem, CID)
    guest = Guest(mem, model)
    guest.give_rx()
    yield path, backend, model, guest
    model.reset()
    backend.close()
    mem.close()


def pump(model, rounds: int = 20) -> None:
    """The device thread's part: poll what the model asks for, hand it what is ready."""
    for _ in range(rounds):
        poller = select.poll()
        for fd, events in model.poll_fds().items():
            poller.register(fd, events)
        ready = poller.poll(200)
        if not ready:
            return
        for fd, revents in ready:
            model.fd_ready(fd, revents)


def host_connect(path: str, text: bytes) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(path)
    client.sendall(text)
    return client


def closed(client: socket.socket) -> bool:
    """The VMM closed the socket (with bytes of ours unread: a reset)."""
    try:
        return client.recv(64) == b""
    except ConnectionResetError:
        return True


def test_host_connect_ok_and_data_both_ways(bridge):
    path, backend, model, guest = bridge
    client = host_connect(path, b"CONNECT 52\nhello guest")
    pump(model)
    [(hdr, _)] = guest.packets()
    assert kinds([(hdr, b"")]) == ["REQUEST"] and hdr.dst_port == 52
    guest.send("RESPONSE", 52, hdr.src_port)
    assert client.recv(64) == f"OK {FIRST_HOST_PORT}\n".encode()
    pump(model)
    assert [p for _, p in guest.packets()] == [b"hello guest"]
    guest.send("RW", 52, FIRST_HOST_PORT, payload=b"hello host")
    assert client.recv(64) == b"hello host"
    client.close()
    pump(model)
    assert kinds(guest.packets()) == ["SHUTDOWN"]
    guest.send("SHUTDOWN", 52, FIRST_HOST_PORT, flags=3)
    assert kinds(guest.packets()) == ["RST"]
    assert not model.conns


def test_host_connect_refused_closes_the_socket(bridge):
    path, backend, model, guest = bridge
    client = host_connect(path, b"CONNECT 53\n")
    pump(model)
    [(hdr, _)] = guest.packets()
    guest.send("RST", 53, hdr.src_port)
    assert client.recv(64) == b""


@pytest.mark.parametrize(
    "line",
    [b"HELLO 5\n", b"CONNECT x\n", b"CONNECT 4294967296\n", b"CONNECT " + b"1" * 40, b"CONN"],
    ids=["not connect", "not a number", "port too big", "too long", "ends early"],
)
def test_a_bad_connect_line_closes_the_socket(bridge, line):
    path, backend, model, guest = bridge
    client = host_connect(path, line)
    if line == b"CONN":
        client.shutdown(socket.SHUT_WR)
    pump(model)
    assert closed(client)
    assert guest.packets() == [] and not backend.pending


def test_guest_connects_to_a_host_listener(bridge):
    path, backend, model, guest = bridge
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{path}_80")
    server.listen(1)
    guest.send("REQUEST", 1234, 80)
    assert kinds(guest.packets()) == ["RESPONSE"]
    conn, _ = server.accept()
    conn.settimeout(5)
    guest.send("RW", 1234, 80, payload=b"line from the guest\n")
    assert conn.recv(64) == b"line from the guest\n"
    conn.sendall(b"answer")
    pump(model)
    assert [p for _, p in guest.packets()] == [b"answer"]
    server.close()
    conn.close()


def test_guest_connect_without_a_listener_is_reset(bridge):
    path, backend, model, guest = bridge
    guest.send("REQUEST", 1234, 81)
    assert kinds(guest.packets()) == ["RST"]


# -- the listening socket --------------------------------------------------------------


def test_the_socket_file_goes_when_closed(tmp_path):
    path = tmp_path / "v.sock"
    backend = open_vsock_uds(str(path))
    assert path.is_socket()
    backend.close()
    assert not path.exists()


def test_a_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "v.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # the file stays, nobody listens
    open_vsock_uds(str(path)).close()


def test_a_live_listener_is_not_replaced(tmp_path):
    path = tmp_path / "v.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    with pytest.raises(ConfigError, match="another process listens there"):
        open_vsock_uds(str(path))
    live.close()


def test_a_file_that_is_no_socket_is_refused(tmp_path):
    path = tmp_path / "v.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        open_vsock_uds(str(path))
    assert path.read_text() == "precious"


def test_a_path_too_long_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="too long"):
        open_vsock_uds(str(tmp_path / ("x" * 100)))


def test_a_directory_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot listen"):
        open_vsock_uds(str(tmp_path / "none" / "v.sock"))


def test_closing_the_backend_closes_its_streams(bridge):
    path, backend, model, guest = bridge
    client = host_connect(path, b"CONNECT 52\n")
    pump(model)
    [(hdr, _)] = guest.packets()
    guest.send("RESPONSE", 52, hdr.src_port)
    assert client.recv(64).startswith(b"OK ")
    backend.close()  # the partition ends
    assert closed(client) and not backend.streams
