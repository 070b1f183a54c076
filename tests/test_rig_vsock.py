"""Inside the hardware-virtualization rig: Debian's stock kernel finds osvmm's
virtio-vsock device through the DSDT (LNRO0005), with its own virtio_mmio and
vmw_vsock_virtio_transport modules loaded from the initramfs, and talks to the
host both ways over Firecracker's Unix-socket protocol (tools/osvmm-vsock.c in
the guest):

- guest -> host: the guest connects to CID 2 port 6000; the VMM connects to the
  host's listener at PATH_6000, which reads the guest's line and answers;
- host -> guest: the host connects to PATH, writes "CONNECT 5000\\n" (again until
  the guest listens: before, the guest refuses and the socket is closed), reads
  "OK <port>\\n", sends a line and reads the guest's echo of it.

The socket file at PATH is gone when the partition has ended.
(scripts/hwvirt-rig, docs/testing.md; docs/devices.md "virtio-vsock".)"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from osvmm.boot import kmodules
from tests.helpers import run_osvmm
from tests.rig_helpers import script_initrd, vsock_tool
from tests.test_rig_linux import VMLINUX

pytestmark = pytest.mark.rig

GUEST_PORT = 5000
HOST_PORT = 6000
PING = b"ping over vsock, host to guest\n"

SCRIPT = f"""#!/bin/sh
/bin/osvmm-vsock listen {GUEST_PORT} &
/bin/osvmm-vsock send 2 {HOST_PORT} "hello from the guest"
wait
grep virtio /proc/interrupts | sed 's/^ */vsock: irq /'
"""


@pytest.fixture(scope="module")
def initrd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vsock")
    return script_initrd(
        tmp, "vsocktest", SCRIPT, kmodules.VIRTIO_VSOCK_MODULES, (vsock_tool(tmp),)
    )


def host_listener(path: str, result: dict) -> socket.socket:
    """PATH_6000: takes the guest's connection, reads its line to its end, answers."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{path}_{HOST_PORT}")
    server.listen(1)
    server.settimeout(400)

    def serve():
        try:
            conn, _ = server.accept()
            conn.settimeout(60)
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            result["guest said"] = data
            conn.sendall(b"hello guest, the host read: " + data)
            conn.close()
        except OSError as e:
            result["listener error"] = repr(e)

    threading.Thread(target=serve, daemon=True).start()
    return server


def host_connector(path: str, result: dict, done: threading.Event) -> None:
    """CONNECT 5000 until the guest listens; then a line there and back."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not done.is_set():
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(300)  # one attempt at a time: none left in the backlog
        try:
            client.connect(path)
            client.sendall(f"CONNECT {GUEST_PORT}\n".encode())
            line = b""
            while not line.endswith(b"\n") and (chunk := client.recv(1)):
                line += chunk
            if not line.startswith(b"OK "):
                result["refused"] = result.get("refused", 0) + 1
                raise ConnectionRefusedError  # nobody listens in the guest yet
            result["ok line"] = line
            client.sendall(PING)
            client.shutdown(socket.SHUT_WR)
            echo = b""
            while chunk := client.recv(4096):
                echo += chunk
            result["echo"] = echo
            return
        except OSError:
            time.sleep(0.3)
        finally:
            client.close()


def test_linux_talks_to_the_host_over_vsock(initrd, tmp_path):
    path = str(tmp_path / "v.sock")
    result: dict = {}
    done = threading.Event()
    server = host_listener(path, result)
    connector = threading.Thread(target=host_connector, args=(path, result, done), daemon=True)
    connector.start()
    try:
        r = run_osvmm(
            "run",
            "--kernel",
            str(VMLINUX),
            "--initrd",
            str(initrd),
            "--memory",
            "256M",
            "--vsock",
            f"uds={path},cid=7",
            "--append",
            "console=ttyS0 panic=-1 -- /bin/vsocktest",
            timeout=450,
        )
    finally:
        done.set()
        connector.join(5)
        server.close()
    out = r.stdout.decode(errors="replace")
    console = out[-4000:] + r.stderr.decode(errors="replace")
    assert r.returncode == 0, console
    assert "osvmm-initramfs: exit 0" in out, console
    lines = [line for line in out.splitlines() if line.startswith("vsock: ")]
    # guest -> host
    assert result.get("guest said") == b"hello from the guest\n", (result, console)
    assert "vsock: reply hello guest, the host read: hello from the guest" in lines, console
    # host -> guest
    assert result.get("ok line", b"").startswith(b"OK "), (result, console)
    assert int(result["ok line"][3:]) >= 1 << 30  # the host end's port
    assert result.get("echo") == PING, (result, console)
    assert f"vsock: echoed {len(PING)} bytes" in lines, console
    irq = [line.split() for line in lines if line.endswith("virtio0")]
    assert irq and "5-edge" in irq[0] and int(irq[0][3]) > 0, console  # the first slot
    assert not os.path.exists(path)  # removed when the partition ended
    assert os.path.exists(f"{path}_{HOST_PORT}")  # the host's own listener left alone
