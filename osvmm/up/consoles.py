"""The partitions' consoles under ``osvmm up``: one hub per partition, fanned out
to sinks that can never block or kill a vCPU.

A partition's UART output goes, through its ``ConsoleHub``, to

- its log, ``<log_dir>/<name>.console.log`` (a ``LogFile``: private, capped by
  rotation), through a ``Spool`` of its own;
- a short history replayed to a client that attaches;
- every attached ``ConsoleClient``, each a bounded buffer drained by the
  client's own thread (bytes that find it empty are written straight to the
  client's socket, without blocking, when the socket takes them: one thread
  hand-off fewer for a console that keeps up);
- ``echo`` (``LineEcho``: line by line, ``NAME | line``, to the supervisor's
  stdout through one shared ``Spool``).

A ``Spool`` holds at most ``limit`` bytes for one sink and writes them on its
own thread: the vCPU only appends to a buffer. A sink that is slow (a pipe
nobody reads, a paused terminal, a slow disk) loses what does not fit; one
that fails (a full disk, a closed stdout) loses what it could not write. Both
are counted, shown by ``osvmm ps`` and reported in the event log, and the
partition never waits.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable

from osvmm.plan.config import DEFAULT_LOG_MAX
from osvmm.up.hostfiles import open_private

__all__ = ["DEFAULT_LOG_MAX", "ConsoleClient", "ConsoleHub", "LineEcho", "LogFile", "Spool"]

HISTORY_BYTES = 16 << 10  # console output kept for a client that attaches later
CLIENT_BUFFER = 1 << 20  # a slow console client loses its oldest bytes beyond this
LOG_SPOOL = 1 << 20  # console bytes waiting for the log file; beyond, dropped
ECHO_SPOOL = 1 << 20  # bytes waiting for stdout (all partitions); beyond, dropped
DROP_REPORT_S = 60.0  # a sink's dropping is reported at most this often
MAX_ECHO_LINE = 4096  # a line without a newline is printed once it is this long


class Spool:
    """Bytes for one sink, written by the spool's own thread with ``write``: ``put``
    never blocks; beyond ``limit`` bytes waiting, what comes is dropped (``dropped``);
    what ``write`` fails on is lost (``lost``, ``error``: the last failure, "" once it
    writes again). ``report(text)`` is told when failures begin and end, and when
    dropping begins (at most once a minute)."""

    def __init__(
        self,
        name: str,
        write: Callable[[bytes], None],
        limit: int,
        report: Callable[[str], None] | None = None,
    ):
        self.name = name
        self._write = write
        self._limit = limit
        self.report = report
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closing = False
        self._writing = False
        self._dropping = False  # dropping since the writer last took the buffer
        self._told_drop = -DROP_REPORT_S
        self.dropped = 0
        self.lost = 0
        self.error = ""
        self._lost_in_failure = 0
        self._thread = threading.Thread(target=self._run, name=f"spool-{name}", daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> bool:
        with self._cond:
            if not self._closing and len(self._buf) + len(data) <= self._limit:
                if not self._buf:
                    self._cond.notify_all()
                self._buf += data
                return True
            self.dropped += len(data)
            now = time.monotonic()
            tell = not self._dropping and now - self._told_drop >= DROP_REPORT_S
            self._dropping = True
            if tell:
                self._told_drop = now
        if tell and not self._closing:
            self._tell(f"{self.name}: the reader is slow: output is being dropped (see osvmm ps)")
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._closing:
                    self._cond.wait()
                if not self._buf:
                    return
                data = bytes(self._buf)
                self._buf.clear()
                self._writing = True
                self._dropping = False
            try:
                self._write(data)
            except Exception as err:  # noqa: BLE001 - a failing sink loses bytes, nothing more
                self._failed(err, len(data))
            else:
                if self.error:
                    self._tell(f"{self.name}: written again ({self._lost_in_failure} bytes lost)")
                    self.error = ""
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until what was put has been written (or failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._buf and not self._writing, timeout)

    def _failed(self, err: Exception, n: int) -> None:
        self.lost += n
        why = getattr(err, "strerror", None) or f"{type(err).__name__}: {err}"
        if not self.error:
            self._lost_in_failure = 0
            self._tell(f"{self.name}: cannot write ({why}): output is being lost")
        self._lost_in_failure += n
        self.error = why

    def _tell(self, text: str) -> None:
        if self.report is not None:
            try:
                self.report(text)
            except Exception:  # noqa: BLE001, S110 - reporting must not end the spool
                pass

    @property
    def missing(self) -> int:
        """Bytes that did not reach the sink: dropped (too slow) and lost (failed)."""
        return self.dropped + self.lost

    def close(self, timeout: float = 2.0) -> None:
        """Write what waits (for at most ``timeout``), then end the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)


def fd_sink(fd: int) -> Callable[[bytes], None]:
    """A ``write`` for a Spool: all of ``data`` to ``fd`` (a non-blocking one waited on)."""

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                select.select([], [fd], [], 1.0)

    return write


class LogFile:
    """An append-only log ``name`` in a private directory (osvmm/up/hostfiles.py),
    capped by rotation: once it holds ``max_bytes`` it is renamed ``name.1``
    (replacing the one before) and a fresh ``name`` begins, so it keeps at most
    twice ``max_bytes`` on disk. ``write`` raises OSError on failure
    (for the Spool to count)."""

    def __init__(self, dir_fd: int, name: str, path: str, max_bytes: int, what: str = "log_dir"):
        self.dir_fd = dir_fd
        self.name = name
        self.path = path  # for people: where it is
        self.max_bytes = max_bytes
        self.what = what
        self._fd: int | None = open_private(dir_fd, name, what)
        self._size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        with self._lock:
            while view:
                if self._size >= self.max_bytes:
                    self._rotate()
                if self._fd is None:
                    self._fd = open_private(self.dir_fd, self.name, self.what)
                    self._size = os.fstat(self._fd).st_size
                n = os.write(self._fd, view[: max(self.max_bytes - self._size, 1)])
                self._size += n
                view = view[n:]

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.replace(self.name, self.name + ".1", src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        self._size = 0

    def reopen(self) -> None:
        """The next write opens ``name`` afresh (a log rotated by another program)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class ConsoleClient:
    """An attached console: a bounded buffer drained by the client's own thread
    (``take``, then ``taken`` once sent). With ``direct`` set (a write that never
    blocks: it returns how many bytes it took, or raises BlockingIOError), ``push``
    writes bytes straight out when nothing is waiting before them."""

    def __init__(self):
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._held = False  # the drain thread has bytes from take() not yet sent
        self.direct: Callable[[bytes], int] | None = None
        self.closed = False
        self.dropped = 0

    def push(self, data: bytes) -> int:
        """Send or append ``data``; the oldest bytes beyond CLIENT_BUFFER go: how
        many went."""
        with self._cond:
            if self.direct is not None and not self._buf and not self._held and not self.closed:
                try:
                    data = data[self.direct(data) :]
                except BlockingIOError:
                    pass
                except OSError:  # the drain thread meets the error on its next send
                    self.direct = None
                if not data:
                    return 0
            self._buf += data
            extra = len(self._buf) - CLIENT_BUFFER
            if extra > 0:
                del self._buf[:extra]
                self.dropped += extra
            self._cond.notify()
            return max(extra, 0)

    def take(self, timeout: float = 0.5) -> bytes:
        """The bytes waiting (b"" after ``timeout`` or once closed)."""
        with self._cond:
            if not self._buf and not self.closed:
                self._cond.wait(timeout)
            data = bytes(self._buf)
            self._buf.clear()
            self._held = bool(data)
            return data

    def taken(self) -> None:
        """The bytes of the last ``take`` are sent: ``push`` may write directly again."""
        with self._cond:
            self._held = False

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify()


class ConsoleHub:
    """One partition's console output: log, history, clients, echo. The vCPU thread
    calls ``write``; it only appends to buffers and is never blocked by a sink."""

    def __init__(
        self,
        name: str,
        log: LogFile | None,
        echo: Callable[[str, bytes], None] | None,
        report: Callable[[str], None] | None = None,
    ):
        self.name = name
        self.log = log
        self.log_path = log.path if log is not None else None
        self._log_spool = (
            Spool(f"{name}.console.log", log.write, LOG_SPOOL, report) if log is not None else None
        )
        self._echo = echo
        self._history: deque[bytes] = deque()
        self._history_len = 0
        self._clients: list[ConsoleClient] = []
        self._lock = threading.Lock()
        self.bytes_out = 0
        self.clients_dropped = 0  # bytes attached clients lost for not reading

    def write(self, data: bytes) -> None:
        if self._echo is not None:
            self._echo(self.name, data)
        self._fan_out(data)

    def note(self, text: str) -> None:
        """A line from the VMM into the console stream (not echoed): ``[osvmm: ...]``."""
        self._fan_out(f"[osvmm: {text}]\n".encode())

    def _fan_out(self, data: bytes) -> None:
        # Attached clients first: a client's bytes may go straight to its socket
        # (ConsoleClient.direct), and waking the log's thread first would put a
        # thread switch before them (the start's first byte, bench/warm_start.py).
        with self._lock:
            self.bytes_out += len(data)
            self._history.append(data)
            self._history_len += len(data)
            while self._history_len > HISTORY_BYTES:
                self._history_len -= len(self._history.popleft())
            for c in self._clients:
                self.clients_dropped += c.push(data)
        if self._log_spool is not None:
            self._log_spool.put(data)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the console log has what was written so far."""
        return self._log_spool.flush(timeout) if self._log_spool is not None else True

    def losses(self) -> dict:
        """What ``ps`` shows of the bytes a sink missed, and the log's last error."""
        spool = self._log_spool
        return {
            "log": spool.missing if spool is not None else 0,
            "log_error": spool.error if spool is not None else "",
            "clients": self.clients_dropped,
        }

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
        if self._log_spool is not None:
            self._log_spool.close()
        if self.log is not None:
            self.log.close()


class _Partial:
    __slots__ = ("buf", "lock", "dropped")

    def __init__(self):
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.dropped = 0


class LineEcho:
    """Console bytes to one stream, a line at a time, each prefixed by its partition
    (``NAME | line``), through ``spool``: a reader that is slow or gone loses lines
    (counted per partition in ``dropped``); a line without a newline is printed
    once it is MAX_ECHO_LINE bytes long. Each partition has its own partial line."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self._partial: dict[str, _Partial] = {}
        self._lock = threading.Lock()

    def _state(self, name: str) -> _Partial:
        st = self._partial.get(name)
        if st is None:
            with self._lock:
                st = self._partial.setdefault(name, _Partial())
        return st

    def __call__(self, name: str, data: bytes) -> None:
        st = self._state(name)
        with st.lock:
            st.buf += data
            if b"\n" not in data and len(st.buf) < MAX_ECHO_LINE:
                return
            *lines, rest = st.buf.split(b"\n")
            while len(rest) >= MAX_ECHO_LINE:
                lines.append(rest[:MAX_ECHO_LINE])
                rest = rest[MAX_ECHO_LINE:]
            st.buf = bytearray(rest)
            text = "".join(
                f"{name} | {line.decode('utf-8', 'replace').rstrip(chr(13))}\n" for line in lines
            ).encode()
            if not self.spool.put(text):
                st.dropped += len(text)

    def dropped(self, name: str) -> int:
        st = self._partial.get(name)
        return st.dropped if st is not None else 0
