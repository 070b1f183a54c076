"""virtio-vsock end to end under KVM, without the rig: the bundled ``virtiovsock``
guest drives the device at CPL0 under ``osvmm run --vsock uds=PATH`` and opens
streams both ways with Firecracker's protocol (docs/devices.md): it connects to
the host's port 6000, which the VMM passes to a host listener at ``PATH_6000``
that echoes, and the host connects to its port 5000 through PATH (``CONNECT
5000``), which it echoes. Under ``osvmm up`` a plan's vsock counts a refused
connect in ``osvmm stat``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests.helpers import REPO, run_osvmm

pytestmark = pytest.mark.kvm

SENT = sum(64 + (r * 389) % 2000 for r in range(8))  # the guest's 8 rounds


@pytest.fixture
def path():
    d = tempfile.mkdtemp(prefix="osvmm-vs-", dir="/tmp")  # short: a Unix socket's path
    yield os.path.join(d, "v.sock")
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def echo_listener(path: str) -> tuple[socket.socket, list[bytes], threading.Thread]:
    """A host program listening at ``path``: echoes one connection to its end."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(60)
    got: list[bytes] = []

    def serve():
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                got.append(data)
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return srv, got, thread


def osvmm(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "osvmm.cli", "run", "guests:virtiovsock", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=str(REPO),
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def test_the_guest_connects_to_the_host_and_the_host_to_the_guest(path):
    srv, got, thread = echo_listener(path + "_6000")
    proc = osvmm("--vsock", f"uds={path},cid=7", "--append", "listen=5000")
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        host = socket.socket(socket.AF_UNIX)
        host.settimeout(60)
        host.connect(path)
        host.sendall(b"CONNECT 5000\n")
        reader = host.makefile("rb")
        ok = reader.readline()
        host.sendall(b"hello guest\n")
        echoed = reader.readline()
        host.shutdown(socket.SHUT_WR)
        rest = reader.read()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        srv.close()
    text = out.decode()
    assert proc.returncode == 1, (text, err.decode())  # debug exit 0
    assert ok == b"OK 1073741824\n" and echoed == b"hello guest\n" and rest == b""
    assert text.splitlines() == [
        "virtiovsock: cid 7",
        "virtiovsock: connected to port 6000",
        f"virtiovsock: echoed 8 rounds, {SENT} bytes ok",
        "virtiovsock: accepted host port 1073741824 on port 5000, echoed 12 bytes",
        "virtiovsock: closed",
    ], text
    thread.join(10)
    assert len(b"".join(got)) == SENT and not thread.is_alive()  # the guest closed it
    assert not os.path.exists(path)  # removed when the partition ended


def test_a_connect_to_a_port_nobody_listens_on_is_refused(path):
    r = run_osvmm("run", "guests:virtiovsock", "--vsock", f"uds={path}", "--append", "port=6001")
    text = r.stdout.decode()
    assert r.returncode == 3, (text, r.stderr.decode())  # debug exit 1: the guest's FAIL
    assert text.splitlines() == [
        "virtiovsock: cid 3",
        "virtiovsock: FAIL connect refused (RST): nothing listens at PATH_<port>?",
    ]


def test_a_plans_vsock_under_osvmm_up_counts_the_refused_connect():
    from tests.test_supervisor_up import UpProcess

    up = UpProcess(
        '[[partition]]\nname = "vs"\ncpus = "floating"\nmemory = "8M"\n'
        'image = "guests:virtiovsock"\ncmdline = "port=6001"\nrestart = "stop"\n'
        'vsock = { uds = "v.sock", cid = 5 }\n'
    )
    try:
        up.wait_for(lambda p: p["vs"]["state"] == "stopped" and p["vs"]["boots"] == 1)
        log = (up.logs / "vs.console.log").read_text()
        assert "virtiovsock: cid 5\nvirtiovsock: FAIL connect refused" in log, log
        r = up.cli("stat", "vs", "--json")
        assert r.returncode == 0, r.stderr
        ((dev,),) = (s["devices"] for s in json.loads(r.stdout)["partitions"])
        assert dev["name"] == f"virtio-vsock {up.dir}/v.sock"
        counts = dev["counts"]
        assert (counts["tx"], counts["refused"], counts["rst_sent"], counts["rx"]) == (1, 1, 1, 1)
    finally:
        up.close()
