"""HTTP/1.1 on the control socket: a small bounded parser of requests and
responses, and the bytes of an answer (docs/api.md; RFC 9112 is the framing).

Why not ``http.server``: its handler reads a request line and each header with
a per-``recv`` timeout only (a client dribbling a byte a minute holds its
thread for ever), it accepts up to 100 headers of 64 KiB each and chunked
bodies, it answers errors in HTML, and a request it cannot parse ends in
``send_error`` paths that differ between Python versions. The control socket
needs less and stricter: one deadline for the whole request (head and body),
a head of at most ``MAX_HEAD`` bytes, at most ``MAX_HEADERS`` headers, bodies
framed by ``Content-Length`` only (at most ``MAX_BODY``), every refusal a
status with a one-line JSON error. That fits in the functions below, and each
of their limits is tested (tests/test_control_protocol.py, test_control_fuzz.py).

``read_request(conn, buf, deadline)`` is the server's side, ``read_response``
the client's (osvmm/up/protocol.py); both read from a socket into ``buf``,
which keeps whatever came after the message (the next request, or a console's
first bytes after an upgrade).
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass, field

MAX_HEAD = 16 << 10  # request (or status) line and headers
MAX_HEADERS = 64
MAX_BODY = 64 << 10  # a request body; larger is answered 413 and the connection closed
MAX_ANSWER = 64 << 20  # what a client accepts as a response body

REASONS = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # a method or a header's name
_TARGET = re.compile(rb"/[\x21-\x7e]*\Z")  # an absolute path (and query), visible ASCII
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # in a header's value (tab allowed)


class HttpError(Exception):
    """A request that cannot be read as HTTP: answered with ``status`` and
    ``message``, then the connection is closed (its framing is lost)."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


@dataclass
class Request:
    method: str
    path: str  # the target without its query, still percent-encoded
    query: str  # what followed '?' ('' without one)
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        conn = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    def upgrade(self) -> str | None:
        """The protocol asked for by ``Connection: Upgrade`` and ``Upgrade: P``."""
        conn = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if "upgrade" not in conn:
            return None
        return self.headers.get("upgrade", "").strip().lower() or None


def _read_head(conn: socket.socket, buf: bytearray, deadline: float | None, limit: int) -> bytes:
    """Bytes up to the blank line ending a head (removed from ``buf``), within
    ``deadline`` (TimeoutError) and ``limit`` bytes (HttpError 431). EOFError at
    the end of the stream before a head began; ConnectionError within one."""
    start = 0
    while True:
        end = buf.find(b"\r\n\r\n", max(start - 3, 0))
        if end >= 0:
            head = bytes(buf[:end])
            del buf[: end + 4]
            return head
        if len(buf) > limit:
            raise HttpError(431, f"a request head over {limit} bytes")
        start = len(buf)
        _recv(conn, buf, deadline)


def _recv(conn: socket.socket, buf: bytearray, deadline: float | None) -> None:
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
    chunk = conn.recv(65536)
    if not chunk:
        if buf:
            raise ConnectionError("the peer closed the connection within a message")
        raise EOFError
    buf += chunk


def _headers(lines: list[bytes]) -> dict[str, str]:
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "a malformed header field")
        try:
            text = value.strip(b" \t").decode("ascii")
        except UnicodeDecodeError:
            raise HttpError(400, "a header field that is not ASCII") from None
        if _CONTROL.search(text):
            raise HttpError(400, "a header field with a control character")
        key = name.decode("ascii").lower()
        if key in headers:
            if key in ("content-length", "host", "upgrade"):
                raise HttpError(400, f"header field {key} given twice")
            headers[key] += ", " + text
        else:
            headers[key] = text
    return headers


def _content_length(headers: dict[str, str], limit: int) -> int:
    if "transfer-encoding" in headers:
        raise HttpError(501, "a body in a transfer coding: send it with Content-Length")
    value = headers.get("content-length")
    if value is None:
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise HttpError(400, "Content-Length is not a number")
    length = int(value)
    if length > limit:
        raise HttpError(413, f"a request body over {limit} bytes")
    return length


def _read_body(conn: socket.socket, buf: bytearray, length: int, deadline: float | None) -> bytes:
    while len(buf) < length:
        try:
            _recv(conn, buf, deadline)
        except EOFError:
            raise ConnectionError("the peer closed the connection within a body") from None
    body = bytes(buf[:length])
    del buf[:length]
    return body


def read_request(conn: socket.socket, buf: bytearray, deadline: float) -> Request | None:
    """The next request, whole by ``deadline``; None when the client closed the
    connection between requests. HttpError for one that cannot be read (answer
    it, then close); TimeoutError or OSError when the client is slow or gone."""
    try:
        head = _read_head(conn, buf, deadline, MAX_HEAD)
    except EOFError:
        return None
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]):
        raise HttpError(400, "a malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise HttpError(505, "only HTTP/1.1 and HTTP/1.0 are spoken here")
        raise HttpError(400, "a malformed request line")
    if not _TARGET.match(target):
        raise HttpError(400, "a request target is an absolute path")
    headers = _headers(lines[1:])
    length = _content_length(headers, MAX_BODY)
    body = _read_body(conn, buf, length, deadline)
    path, _, query = target.decode("ascii").partition("?")
    return Request(method.decode("ascii"), path, query, version.decode("ascii"), headers, body)


def response(
    status: int,
    body: bytes = b"",
    content_type: str | None = "application/json",
    close: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """The bytes of one response."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    if status != 101:
        if content_type is not None and body:
            lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in extra]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def json_response(status: int, value: dict, close: bool = False, extra=()) -> bytes:
    body = json.dumps(value, separators=(",", ":")).encode() + b"\n"
    return response(status, body, "application/json", close, extra)


def error_response(status: int, message: str, close: bool = False, extra=()) -> bytes:
    return json_response(status, {"error": message}, close, extra)


# -- the client's side --------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def request_bytes(method: str, target: str, body: bytes | None = None, extra=()) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: osvmm"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")


def read_response(conn: socket.socket, buf: bytearray, head_only: bool = False) -> Response:
    """The next response (its body read unless ``head_only``, a 101's has none).
    ValueError for one that is not HTTP; OSError and TimeoutError as the socket's."""
    try:
        head = _read_head(conn, buf, None, MAX_HEAD)
    except EOFError:
        raise ConnectionError("the VMM closed the connection without an answer") from None
    except ConnectionError as e:
        if e.errno is not None:
            raise
        raise ConnectionError("the VMM closed the connection within its answer") from None
    except HttpError as err:
        raise ValueError(str(err)) from None
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError("not an HTTP response")
    try:
        headers = _headers(lines[1:])
        length = 0 if head_only else _content_length(headers, MAX_ANSWER)
    except HttpError as err:
        raise ValueError(str(err)) from None
    status = int(parts[1])
    try:
        body = b"" if status == 101 else _read_body(conn, buf, length, None)
    except ConnectionError as e:
        if e.errno is not None:
            raise
        raise ConnectionError("the VMM closed the connection within its answer") from None
    return Response(status, headers, body)
