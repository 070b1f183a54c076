"""The control socket's framing and its client: JSON over a Unix stream
socket, one request and one response per line (docs/control-socket.md is the
protocol; osvmm/up/server.py is the VMM's side).

``request(path, msg)`` is the client: it sends one request and returns the
response, raising ControlError (a one-line message, status 2) when no VMM is
listening or the VMM answers ``{"ok": false, "error": ...}``. ``connect``,
``send``, ``read_line`` and ``exchange`` are its parts, for a client that keeps
its connection (``console`` turns it into a raw byte stream once answered).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import time

from osvmm.errors import ControlError

PROTOCOL_VERSION = 1
MAX_LINE = 64 << 10  # a request line longer than this is refused


def not_listening(path: str) -> ControlError:
    return ControlError(f"no VMM is listening on {path}: start one with osvmm up FILE")


# -- the client ---------------------------------------------------------------------------------


CONNECT_RETRY_S = 0.01  # the VMM's listen backlog is full: try again this soon


def connect(path: str, timeout: float | None = 30) -> socket.socket:
    """A connection to the VMM on ``path``, checked to be one we may trust: the
    socket file and the process serving it belong to this user or to root."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise not_listening(path) from None
    except OSError as e:
        raise ControlError(f"cannot connect to {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} is not a socket")
    if st.st_uid not in (os.geteuid(), 0):
        raise ControlError(f"{path} belongs to uid {st.st_uid}, not to you or root: not used")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise not_listening(path) from None
        except OSError as e:
            sock.close()
            busy = e.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or isinstance(e, TimeoutError)
            if busy and (deadline is None or time.monotonic() < deadline):
                time.sleep(CONNECT_RETRY_S)  # its backlog is full: it is busy, not gone
                continue
            raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
    try:
        uid = peer_uid(sock)
    except OSError as e:
        sock.close()
        raise ControlError(f"cannot connect to {path}: {e.strerror}") from None
    if uid not in (os.geteuid(), 0):
        sock.close()
        raise ControlError(f"{path} is served by uid {uid}, not by you or root: not a VMM to trust")
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def send(sock: socket.socket, msg: dict) -> None:
    sock.sendall(json.dumps(msg).encode() + b"\n")


def read_line(sock: socket.socket, buf: bytearray) -> bytes | None:
    """The next line from ``sock`` (without the newline); None at EOF. ``buf``
    keeps what was read beyond the line (it belongs to the next read)."""
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            raise ControlError(f"a control line over {MAX_LINE} bytes")
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


def exchange(sock: socket.socket, msg: dict, buf: bytearray | None = None) -> dict:
    """Send ``msg`` and return the response; ControlError if it says ``ok: false``."""
    buf = bytearray() if buf is None else buf
    try:
        try:
            send(sock, msg)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may have answered before closing (a refusal): that answer is read
        line = read_line(sock, buf)
    except TimeoutError:
        raise ControlError(f"the VMM did not answer {msg.get('cmd')!r} in time") from None
    except OSError as e:
        raise ControlError(f"control connection failed: {e.strerror or e}") from None
    if line is None:
        raise ControlError("the VMM closed the control connection without an answer")
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError("the VMM sent a malformed answer")
    if not reply["ok"]:
        error = reply.get("error")
        raise ControlError(error if isinstance(error, str) else "the VMM refused the request")
    return reply


def request(path: str, msg: dict, timeout: float = 60) -> dict:
    """One request on a fresh connection; the response (``ok`` is true)."""
    with connect(path, timeout) as sock:
        return exchange(sock, msg)


def is_listening(path: str) -> bool:
    try:
        connect(path, timeout=2).close()
        return True
    except ControlError:
        return False
