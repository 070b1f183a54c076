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

import json
import socket

from osvmm.errors import ControlError

PROTOCOL_VERSION = 1
MAX_LINE = 64 << 10  # a request line longer than this is refused


def not_listening(path: str) -> ControlError:
    return ControlError(f"no VMM is listening on {path}: start one with osvmm up FILE")


# -- the client ---------------------------------------------------------------------------------


def connect(path: str, timeout: float | None = 30) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise not_listening(path) from None
    except OSError as e:
        sock.close()
        raise ControlError(f"cannot connect to {path}: {e.strerror}") from None
    return sock


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
        send(sock, msg)
        line = read_line(sock, buf)
    except TimeoutError:
        raise ControlError(f"the VMM did not answer {msg.get('cmd')!r} in time") from None
    except OSError as e:
        raise ControlError(f"control connection failed: {e.strerror or e}") from None
    if line is None:
        raise ControlError("the VMM closed the control connection without an answer")
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError("the VMM sent a malformed answer") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "the VMM refused the request"))
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
