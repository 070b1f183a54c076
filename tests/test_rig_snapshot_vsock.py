"""A Linux partition's vsock across a snapshot and a restore, inside the rig
(scripts/hwvirt-rig, docs/testing.md; docs/snapshots.md): the restored device
sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, as Firecracker's does, so the guest
drops the connection it had (its program sees the reset) and takes new ones.

Debian's kernel with its virtio_mmio and vmw_vsock_virtio_transport modules
runs tools/osvmm-vsock.c's ``listen 5000`` twice in a row. The host connects
through the Unix socket (``CONNECT 5000``), has a line echoed and keeps the
connection open; ``osvmm run --snapshot DIR --snapshot-stop`` gets SIGUSR2 (the
host's end sees the stream end); ``osvmm run --restore DIR`` goes on: the first
listener's read fails (the reset), the second one echoes a new connection's
line, and the run ends as the script does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from osvmm.boot import kmodules
from tests.rig_helpers import osvmm_run, script_initrd, vsock_tool
from tests.test_rig_linux import BOOT_TIMEOUT, VMLINUX, wait_for

pytestmark = pytest.mark.rig

GUEST_PORT = 5000
BEFORE = b"a line before the snapshot\n"
AFTER = b"a line after the restore\n"

SCRIPT = f"""#!/bin/sh
/bin/osvmm-vsock listen {GUEST_PORT}
echo "vsock: first listener ended $?"
/bin/osvmm-vsock listen {GUEST_PORT}
echo "vsock: second listener ended $?"
"""


@pytest.fixture(scope="module")
def initrd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vsnap")
    return script_initrd(
        tmp, "vsnaptest", SCRIPT, kmodules.VIRTIO_VSOCK_MODULES, (vsock_tool(tmp),)
    )


def text(path: Path) -> str:
    both = [Path(path), Path(f"{path}.err")]
    return "".join(p.read_bytes().decode(errors="replace") for p in both if p.exists())


def connect(path: str, proc: subprocess.Popen, out: Path) -> socket.socket:
    """A connection to the guest's port through PATH (``CONNECT``, ``OK``), tried
    again until the guest listens."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        assert proc.poll() is None, text(out)[-3000:]
        assert time.monotonic() < deadline, text(out)[-3000:]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(120)
        try:
            client.connect(path)
            client.sendall(f"CONNECT {GUEST_PORT}\n".encode())
            line = b""
            while not line.endswith(b"\n") and (chunk := client.recv(1)):
                line += chunk
            if line.startswith(b"OK "):
                return client
        except OSError:
            pass
        client.close()
        time.sleep(0.5)


def echo(client: socket.socket, data: bytes) -> bytes:
    client.sendall(data)
    got = b""
    while len(got) < len(data) and (chunk := client.recv(4096)):
        got += chunk
    return got


def test_a_vsock_connection_is_reset_by_a_restore_and_new_ones_work(initrd, tmp_path):
    path = str(tmp_path / "v.sock")
    snap, first, second = tmp_path / "snap", tmp_path / "first.out", tmp_path / "second.out"
    run = osvmm_run(
        first,
        "--kernel",
        str(VMLINUX),
        "--initrd",
        str(initrd),
        "--memory",
        "256M",
        "--vsock",
        f"uds={path},cid=7",
        "--append",
        "console=ttyS0 panic=-1 quiet -- /bin/vsnaptest",
        "--snapshot",
        str(snap),
        "--snapshot-stop",
    )
    old = None
    try:
        old = connect(path, run, first)
        assert echo(old, BEFORE) == BEFORE, text(first)[-3000:]
        run.send_signal(signal.SIGUSR2)
        assert run.wait(120) == 0, text(first)[-3000:]
        assert old.recv(4096) == b""  # the host's end: the stream ended with the VMM
    finally:
        if old is not None:
            old.close()
        if run.poll() is None:
            run.kill()
            run.wait()
    assert "osvmm: snapshot in" in text(first), text(first)[-3000:]
    assert "first listener ended" not in text(first)

    back = osvmm_run(second, "--restore", str(snap))
    try:
        wait_for(
            "the first listener reset",
            lambda: "vsock: first listener ended" in text(second),
            120,
            abort=lambda: None if back.poll() is None else text(second)[-3000:],
        )
        new = connect(path, back, second)
        try:
            new.sendall(AFTER)
            new.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := new.recv(4096):
                got += chunk
        finally:
            new.close()
        assert got == AFTER, text(second)[-3000:]
        assert back.wait(120) == 0, text(second)[-3000:]
    finally:
        if back.poll() is None:
            back.kill()
            back.wait()
    out = text(second)
    assert "osvmm-initramfs: exit 0" in out, out[-3000:]
    assert "vsock: first listener ended 1" in out, out[-3000:]  # its read saw the reset
    assert f"vsock: echoed {len(AFTER)} bytes" in out and "second listener ended 0" in out, out
    assert not os.path.exists(path)
