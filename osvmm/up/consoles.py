"""The partitions' consoles under ``osvmm up``: one hub per partition, fanned out.

A partition's UART output goes, through its ``ConsoleHub``, to
``<log_dir>/<name>.console.log``, to a short history replayed to a client that
attaches, to every attached ``ConsoleClient`` (each a bounded buffer drained by
its own thread, so a slow client never blocks the vCPU), and to ``echo``
(``LineEcho``: line by line to the supervisor's stdout, ``NAME | line``).
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable

HISTORY_BYTES = 16 << 10  # console output kept for a client that attaches later
CLIENT_BUFFER = 1 << 20  # a slow console client loses its oldest bytes beyond this


class ConsoleClient:
    """An attached console: a bounded buffer drained by the client's own thread."""

    def __init__(self):
        self._buf = bytearray()
        self._cond = threading.Condition()
        self.closed = False
        self.dropped = 0

    def push(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            if len(self._buf) > CLIENT_BUFFER:
                extra = len(self._buf) - CLIENT_BUFFER
                del self._buf[:extra]
                self.dropped += extra
            self._cond.notify()

    def take(self, timeout: float = 0.5) -> bytes:
        """The bytes waiting (b"" after ``timeout`` or once closed)."""
        with self._cond:
            if not self._buf and not self.closed:
                self._cond.wait(timeout)
            data = bytes(self._buf)
            self._buf.clear()
            return data

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify()


class ConsoleHub:
    """One partition's console output: log file, history, clients, echo; the vCPU
    thread calls ``write`` once per guest byte and is never blocked by a client."""

    def __init__(self, name: str, log_path: str | None, echo: Callable[[str, bytes], None] | None):
        self.name = name
        self.log_path = log_path
        self._log_fd = None
        if log_path is not None:
            self._log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._echo = echo
        self._history: deque[bytes] = deque()
        self._history_len = 0
        self._clients: list[ConsoleClient] = []
        self._lock = threading.Lock()
        self.bytes_out = 0

    def write(self, data: bytes) -> None:
        if self._log_fd is not None:
            try:
                os.write(self._log_fd, data)
            except OSError:
                pass
        if self._echo is not None:
            self._echo(self.name, data)
        with self._lock:
            self.bytes_out += len(data)
            self._history.append(data)
            self._history_len += len(data)
            while self._history_len > HISTORY_BYTES:
                self._history_len -= len(self._history.popleft())
            for c in self._clients:
                c.push(data)

    def note(self, text: str) -> None:
        """A line from the VMM into the console stream (not echoed): ``[osvmm: ...]``."""
        line = f"[osvmm: {text}]\n".encode()
        echo, self._echo = self._echo, None
        try:
            self.write(line)
        finally:
            self._echo = echo

    def attach(self) -> ConsoleClient:
        client = ConsoleClient()
        with self._lock:
            client.push(b"".join(self._history))
            self._clients.append(client)
        return client

    def detach(self, client: ConsoleClient) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        client.close()

    def close(self) -> None:
        with self._lock:
            for c in self._clients:
                c.close()
            self._clients.clear()
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None


class LineEcho:
    """Console bytes to a stream, a line at a time, each prefixed by its partition."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self._partial: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, data: bytes) -> None:
        with self._lock:
            buf = self._partial.get(name, b"") + data
            *lines, rest = buf.split(b"\n")
            self._partial[name] = rest
            for line in lines:
                text = line.decode("utf-8", "replace").rstrip("\r")
                try:
                    self.out.write(f"{name} | {text}\n")
                    self.out.flush()
                except (OSError, ValueError):
                    pass
