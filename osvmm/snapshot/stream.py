"""The migration stream: addresses, and the frames a migration sends (docs/snapshots.md).

An address is ``unix:PATH`` or ``tcp:HOST:PORT``. The source connects; the
destination (``osvmm up --incoming ADDR``) listens. Every frame is a 4-byte
kind, an 8-byte little-endian payload length, then the payload:

    HELO  source -> dest  JSON: version, partition name, vCPU profile
    OKAY  dest -> source  JSON: the destination accepts it (memory allocated)
    FAIL  either way      JSON: {"error": one line}; the migration is over
    PAGE  source -> dest  u64 guest-physical address, then whole pages of data
    STAT  source -> dest  the partition's state: a state file's bytes (format.py)
    IMAG  source -> dest  u16 name length, the name, then the image's bytes
    DONE  source -> dest  nothing more: build the partition and run it
    RUNS  dest -> source  JSON: the partition runs at the destination

A takeover (a new VMM taking every partition of an old one on the same host,
``osvmm up --takeover``) sends, per partition, between HELO and DONE:

    PART  source -> dest  JSON: {"name": N}: the frames up to the next PART are N's
    FDS   source -> dest  JSON: the RAM regions passed as file descriptors
                          ({"regions": [{"gpa", "size", "fd": index}]}), the
                          memfds themselves beside the frame (SCM_RIGHTS,
                          Unix sockets only); pages of other regions follow

A frame's payload is at most MAX_FRAME bytes; a peer sending more, or an
unknown kind, ends the migration. No authentication: use a Unix socket
(created mode 0600) or a trusted network.
"""

from __future__ import annotations

import json
import os
import socket
import struct

from osvmm.errors import ConfigError, SnapshotError

STREAM_VERSION = 1
HEADER = struct.Struct("<4sQ")
MAX_FRAME = 64 << 20
KINDS = (b"HELO", b"OKAY", b"FAIL", b"PAGE", b"STAT", b"IMAG", b"DONE", b"RUNS", b"PART", b"FDS ")
MAX_FDS = 64  # file descriptors with one frame at most


def parse_address(text: str) -> tuple[int, object]:
    """(socket family, address) of ``unix:PATH`` or ``tcp:HOST:PORT``."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return socket.AF_INET, (host.strip("[]"), int(port))
    raise ConfigError(f"{text!r} is not an address: write unix:PATH or tcp:HOST:PORT")


def connect(text: str, timeout: float = 10) -> socket.socket:
    family, addr = parse_address(text)
    try:
        if family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(addr)
        else:
            sock = socket.create_connection(addr, timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        raise SnapshotError(f"cannot reach the destination {text}: {e.strerror or e}") from None
    return sock


def listen(text: str) -> socket.socket:
    family, addr = parse_address(text)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            if os.path.exists(addr):
                os.unlink(addr)
            sock.bind(addr)
            os.chmod(addr, 0o600)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        sock.listen(4)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--incoming {text}: cannot listen: {e.strerror or e}") from None
    return sock


class Stream:
    """Frames over a connected socket; a broken or misbehaving peer is a SnapshotError."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer
        self.sent = 0  # payload bytes sent
        self.fds: list[int] = []  # received with the last frame header (SCM_RIGHTS), the caller's

    def _lost(self, err: OSError) -> SnapshotError:
        reason = self._their_reason() if isinstance(err, ConnectionError) else None
        if reason is not None:
            return SnapshotError(f"the destination refused: {reason}")
        return SnapshotError(f"the connection to {self.peer} failed: {err.strerror or err}")

    def _their_reason(self) -> str | None:
        """The FAIL a peer sent before it closed the connection, if it is there."""
        try:
            self.sock.settimeout(1)
            head = self.sock.recv(HEADER.size, socket.MSG_PEEK)
            if len(head) < HEADER.size:
                return None
            kind, length = HEADER.unpack(self.sock.recv(HEADER.size))
            if kind != b"FAIL" or length > 4096:
                return None
            body = self.sock.recv(length, socket.MSG_WAITALL)
            return str(json.loads(body).get("error"))
        except (OSError, ValueError, AttributeError):
            return None

    def fail(self, error: str) -> None:
        """Tell the peer why, if it still listens (a failure after OKAY)."""
        try:
            self.send_json(b"FAIL", {"error": error})
        except SnapshotError:
            pass

    def send(self, kind: bytes, *parts) -> None:
        length = sum(len(p) for p in parts)
        try:
            self.sock.sendall(HEADER.pack(kind, length))
            for p in parts:
                self.sock.sendall(p)
        except OSError as e:
            raise self._lost(e) from None
        self.sent += length

    def send_json(self, kind: bytes, obj: dict) -> None:
        self.send(kind, json.dumps(obj).encode())

    def send_fds(self, kind: bytes, obj: dict, fds: list[int]) -> None:
        """A JSON frame with file descriptors beside it (a Unix socket only)."""
        if len(fds) > MAX_FDS:
            raise SnapshotError(f"{len(fds)} file descriptors in one frame, at most {MAX_FDS}")
        payload = json.dumps(obj).encode()
        data = HEADER.pack(kind, len(payload)) + payload
        try:
            sent = socket.send_fds(self.sock, [data], fds)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except OSError as e:
            raise self._lost(e) from None
        self.sent += len(payload)

    def send_pages(self, gpa: int, data) -> None:
        self.send(b"PAGE", struct.pack("<Q", gpa), data)

    def recv_header(self) -> tuple[bytes, int]:
        """The next frame's kind and length; file descriptors sent with it land in
        ``fds`` (on a Unix socket)."""
        buf = bytearray()
        self.fds = []
        try:
            while len(buf) < HEADER.size:
                if self.sock.family == socket.AF_UNIX:
                    data, fds, _, _ = socket.recv_fds(self.sock, HEADER.size - len(buf), MAX_FDS)
                    self.fds.extend(fds)
                else:
                    data = self.sock.recv(HEADER.size - len(buf))
                if not data:
                    raise SnapshotError(f"{self.peer} closed the connection")
                buf += data
        except OSError as e:
            raise self._lost(e) from None
        kind, length = HEADER.unpack(bytes(buf))
        if kind not in KINDS or length > MAX_FRAME:
            raise SnapshotError(f"{self.peer} sent a bad frame ({kind!r}, {length} bytes)")
        return kind, length

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def recv_into(self, view: memoryview) -> None:
        got = 0
        try:
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise SnapshotError(f"{self.peer} closed the connection")
                got += n
        except OSError as e:
            raise self._lost(e) from None

    def recv_json(self, length: int) -> dict:
        try:
            obj = json.loads(self.recv_exact(length))
        except ValueError:
            raise SnapshotError(f"{self.peer} sent a frame that is not JSON") from None
        if not isinstance(obj, dict):
            raise SnapshotError(f"{self.peer} sent a frame that is not a JSON object")
        return obj

    def expect(self, *kinds: bytes) -> tuple[bytes, dict]:
        """The next frame, a JSON one of ``kinds`` (FAIL raises its error)."""
        kind, length = self.recv_header()
        if kind == b"FAIL":
            msg = self.recv_json(length).get("error", "no reason given")
            raise SnapshotError(f"the destination refused: {msg}")
        if kind not in kinds:
            raise SnapshotError(f"{self.peer} sent {kind.decode()} where {kinds} was due")
        return kind, self.recv_json(length)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
