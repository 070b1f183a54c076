"""The control API's client: HTTP/1.1 with JSON over the VMM's Unix socket, or
over TCP with a bearer token (docs/api.md is the API, docs/openapi.yaml its
contract; osvmm/up/server.py is the VMM's side, osvmm/up/http.py the framing
both sides share).

``call(where, method, target, body)`` is the client: one request on a fresh
connection, its JSON answer; ControlError (a one-line message, status 2) when
no VMM is listening or the VMM answers an error (``{"error": ...}`` with a
status of 400 or more). ``where`` is the path of a Unix socket, or a ``Remote``
(``osvmm up --listen HOST:PORT --token-file FILE``: ``HOST:PORT`` and the
token); every request to a Remote carries ``Authorization: Bearer TOKEN``.
``connect`` and ``exchange`` are its parts, for a client that keeps its
connection; ``attach`` upgrades one to a console stream.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from osvmm.errors import ConfigError, ControlError
from osvmm.up import http


def not_listening(path: str) -> ControlError:
    return ControlError(f"no VMM is listening on {path}: start one with osvmm up FILE")


# -- a VMM on TCP -------------------------------------------------------------------------------

MIN_TOKEN = 16  # characters


@dataclass(frozen=True)
class Remote:
    """A VMM's control API on TCP (``osvmm up --listen``): where, and its token."""

    host: str
    port: int
    token: str = field(default="", repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def headers(self) -> tuple[tuple[str, str], ...]:
        return (("Authorization", f"Bearer {self.token}"),)


def parse_host_port(text: str, option: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT`` (an IPv6 host in brackets); ``option`` names it
    in the error. An empty host is 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {text!r}: write HOST:PORT (127.0.0.1:9464)")
    return host.strip("[]") or "127.0.0.1", int(port)


def read_token(path: str, option: str = "--token-file") -> str:
    """The API token in ``path``: a file of this user's (or root's) that no one
    else may read, holding one line of at least MIN_TOKEN visible characters.
    The VMM reads its own so (``osvmm up --token-file``), and so does a client."""
    from osvmm.files import read_input

    where = f"{option} {path}"
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror}") from None
    if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o077:
        raise ConfigError(
            f"{where}: readable by others or not yours (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}): chmod 600 it"
        )
    text = read_input(path, where, 4096, ConfigError).decode("ascii", "replace")
    token = text.strip()
    if len(token) < MIN_TOKEN or not all(0x21 <= ord(c) < 0x7F for c in token):
        raise ConfigError(
            f"{where}: the token is one line of at least {MIN_TOKEN} visible "
            "ASCII characters (openssl rand -hex 32 makes one)"
        )
    return token


def _connect_tcp(remote: Remote, timeout: float | None) -> socket.socket:
    try:
        sock = socket.create_connection((remote.host, remote.port), timeout)
    except ConnectionRefusedError:
        raise ControlError(f"no VMM is listening on {remote}: connection refused") from None
    except TimeoutError:
        raise ControlError(f"cannot connect to {remote}: timed out") from None
    except OSError as e:
        raise ControlError(f"cannot connect to {remote}: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def headers_of(where) -> tuple[tuple[str, str], ...]:
    """The headers every request to ``where`` carries: a Remote's token."""
    return where.headers() if isinstance(where, Remote) else ()


# -- the client ---------------------------------------------------------------------------------


CONNECT_RETRY_S = 0.01  # the VMM's listen backlog is full: try again this soon


def connect(path, timeout: float | None = 30) -> socket.socket:
    """A connection to the VMM on ``path``, checked to be one we may trust: the
    socket file and the process serving it belong to this user or to root. For a
    ``Remote``, a TCP connection (the token is what the VMM checks)."""
    if isinstance(path, Remote):
        return _connect_tcp(path, timeout)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise not_listening(path) from None
    except OSError as e:
        raise ControlError(f"cannot connect to {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} is not a socket")
    owners = (os.geteuid(), 0)
    if st.st_uid not in owners:
        if not _group_socket(path, st):
            raise ControlError(f"{path} belongs to uid {st.st_uid}, not to you or root: not used")
        owners = (st.st_uid, 0)  # a VMM of another user that gave its socket to our group
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
    if uid not in owners:
        sock.close()
        raise ControlError(f"{path} is served by uid {uid}, not by you or root: not a VMM to trust")
    return sock


def _group_socket(path: str, st: os.stat_result) -> bool:
    """Whether ``path`` is another user's VMM socket given to one of our groups
    (``osvmm up --group``): mode 0660, in a directory of that user's (or root's)
    that no one else can write, so no one else could have put it there."""
    if st.st_gid not in (os.getegid(), *os.getgroups()) or (st.st_mode & 0o060) != 0o060:
        return False
    try:
        d = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return d.st_uid in (st.st_uid, 0) and not d.st_mode & 0o022


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def peer_groups(sock: socket.socket) -> set[int]:
    """The groups of the process at the other end (its primary and supplementary
    groups, from /proc/PID/status: SO_PEERCRED gives the primary one only)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _, gid = struct.unpack("3i", creds)
    groups = {gid}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Groups:"):
                groups.update(int(g) for g in line.split()[1:])
    return groups


def partition_path(name: str, what: str = "") -> str:
    """The API path of partition ``name`` (and of ``what`` under it)."""
    return f"/v1/partitions/{quote(name, safe='')}" + (f"/{what}" if what else "")


def exchange(
    sock: socket.socket,
    method: str,
    target: str,
    body: dict | None = None,
    buf: bytearray | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> dict:
    """Send one request (with ``headers``: ``headers_of(where)``) and return its JSON
    answer; ControlError for an error answer."""
    buf = bytearray() if buf is None else buf
    data = None if body is None else json.dumps(body).encode()
    try:
        try:
            sock.sendall(http.request_bytes(method, target, data, headers))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may have answered before closing (a refusal): that answer is read
        answer = http.read_response(sock, buf)
    except TimeoutError:
        raise ControlError(f"the VMM did not answer {method} {target} in time") from None
    except ValueError:
        raise ControlError("the VMM sent a malformed answer") from None
    except OSError as e:
        if isinstance(e, ConnectionError) and not e.strerror:
            raise ControlError(str(e)) from None
        raise ControlError(f"control connection failed: {e.strerror or e}") from None
    return _json_of(answer)


def _json_of(answer: http.Response) -> dict:
    try:
        value = json.loads(answer.body)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise ControlError("the VMM sent a malformed answer")
    if answer.status >= 400:
        error = value.get("error")
        raise ControlError(error if isinstance(error, str) else "the VMM refused the request")
    if answer.status != 200:
        raise ControlError(f"the VMM answered with status {answer.status}")
    return value


def call(path, method: str, target: str, body: dict | None = None, timeout=60) -> dict:
    """One request on a fresh connection; its JSON answer (a status of 200)."""
    with connect(path, timeout) as sock:
        return exchange(sock, method, target, body, headers=headers_of(path))


def get_raw(path, target: str, timeout: float = 60) -> bytes:
    """The body of a GET whose answer is not JSON (``/metrics``)."""
    with connect(path, timeout) as sock:
        try:
            sock.sendall(http.request_bytes("GET", target, extra=headers_of(path)))
            answer = http.read_response(sock, bytearray())
        except (ValueError, OSError) as e:
            raise ControlError(f"control connection failed: {e}") from None
    if answer.status != 200:
        _json_of(answer)
    return answer.body


def attach(path, name: str, timeout: float = 30) -> tuple[socket.socket, bytes]:
    """A connection upgraded to partition ``name``'s console stream, and the
    console bytes that came with the upgrade."""
    sock = connect(path, timeout)
    buf = bytearray()
    try:
        sock.sendall(
            http.request_bytes(
                "POST",
                partition_path(name, "console"),
                extra=(("Connection", "Upgrade"), ("Upgrade", "tcp"), *headers_of(path)),
            )
        )
        answer = http.read_response(sock, buf)
    except (ValueError, OSError) as e:
        sock.close()
        raise ControlError(f"control connection failed: {e}") from None
    if answer.status != 101:
        sock.close()
        _json_of(answer)
        raise ControlError(f"the VMM answered the console with status {answer.status}")
    return sock, bytes(buf)


def is_listening(path) -> bool:
    try:
        connect(path, timeout=2).close()
        return True
    except ControlError:
        return False
