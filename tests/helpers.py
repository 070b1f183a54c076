"""Helpers shared by tests that run the osvmm command or QEMU."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from osvmm.guests.build import QEMU_MICROVM, cache_root

REPO = Path(__file__).resolve().parent.parent

QEMU_CMD = list(QEMU_MICROVM)

# Debian's stock kernel, where scripts/fetch-debian-kernel leaves it (setup.sh runs it).
KERNEL_DIR = cache_root() / "kernel"
VMLINUX = KERNEL_DIR / "vmlinux"
BZIMAGE = KERNEL_DIR / "vmlinuz"


def run_osvmm(
    *args: str, timeout: float = 120, input: bytes | None = None, prefix: tuple[str, ...] = ()
):
    """Run ``python3 -m osvmm.cli ARGS`` as a user would (under ``prefix``, e.g.
    ``ip netns exec NS``); returns CompletedProcess (bytes)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OSVMM_DEBUG", None)
    return subprocess.run(
        [*prefix, sys.executable, "-m", "osvmm.cli", *args],
        capture_output=True,
        timeout=timeout,
        env=env,
        input=input if input is not None else b"",
        cwd=str(REPO),
    )


@contextmanager
def tap_in_netns(netns: str, tap: str, address: str) -> Iterator[tuple[str, ...]]:
    """A network namespace ``netns`` (``ip netns``) with its loopback up and a
    persistent tap ``tap`` in it at ``address`` (CIDR), up; yields the prefix that
    runs a command inside it (``ip netns exec NETNS``), so that nothing of a test's
    traffic reaches the machine's own network. The namespace, and its tap with it,
    is deleted at the end. Where the machine cannot make one (no iproute2, no tun
    device, no right to a namespace) the test is skipped, and fails in the rig,
    whose L1 has the machine's own tools: there the tun module is loaded first
    (L1 loads only what it needs, and has busybox's modprobe, not kmod)."""
    import pytest

    unavailable = pytest.fail if os.environ.get("OSVMM_RIG") == "1" else pytest.skip
    if not os.path.exists("/dev/net/tun") and os.path.exists("/bin/busybox"):
        subprocess.run(["/bin/busybox", "modprobe", "tun"], capture_output=True)
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        unavailable("needs iproute2 (ip) and /dev/net/tun")
    r = subprocess.run(["ip", "netns", "add", netns], capture_output=True)
    if r.returncode != 0:
        unavailable(f"cannot make a network namespace: {r.stderr.decode().strip()}")
    inside = ("ip", "netns", "exec", netns)
    try:
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "tuntap", "add", tap, "mode", "tap"],
            ["ip", "addr", "add", address, "dev", tap],
            ["ip", "link", "set", tap, "up"],
        ):
            subprocess.run([*inside, *cmd], check=True, capture_output=True)
        yield inside
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)  # its tap with it


def run_qemu(image: str, *extra: str, timeout: float = 120):
    return subprocess.run(
        [*QEMU_CMD, *extra, "-kernel", image],
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class UnixHTTPConnection:
    """An HTTP client over a Unix socket from the standard library (http.client),
    independent of osvmm's own client: what the tests drive the control API with."""

    def __new__(cls, path: str, timeout: float = 30):
        import http.client
        import socket

        class Conn(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)

        return Conn("localhost", timeout=timeout)


def api(path: str, method: str, target: str, body=None, timeout: float = 30):
    """One request with http.client: (status, headers, the parsed JSON body or text)."""
    import json

    conn = UnixHTTPConnection(path, timeout)
    try:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, target, body=data, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        ctype = r.getheader("Content-Type", "")
        value = json.loads(raw) if ctype.startswith("application/json") else raw.decode()
        return r.status, dict(r.getheaders()), value
    finally:
        conn.close()


VMM_NOTE = re.compile(r"\[osvmm: [^\]\n]*\]\n")


def guest_text(path: Path) -> str:
    """A console log with the VMM's ``[osvmm: ...]`` notes taken out: what the guest
    wrote (a note may land in the middle of a line the guest is writing)."""
    return VMM_NOTE.sub("", path.read_text())


def locked(path) -> bool:
    """Whether another open file holds ``path``'s ``flock`` lock (a disk image a VMM
    has open)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        assert e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        return True
    finally:
        os.close(fd)


def end_all(procs, timeout: float = 30) -> None:
    """SIGTERM to each process, then wait for each (killed after ``timeout``)."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def listening(path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()
