"""The VMM's side of the control socket (docs/control-socket.md).

``ControlServer(path, supervisor, on_down)`` answers ``ps``, ``start``,
``stop``, ``restart``, ``stat``, ``console`` and ``down``, one thread per
connection; the framing is osvmm/up/protocol.py's.

Every request is checked against ``REQUESTS`` (each command, its fields and
their JSON types) before anything acts on it; anything else is answered with
a one-line error, and nothing a client sends can end a connection's thread
other than by closing it: malformed JSON, deep nesting, invalid UTF-8, a line
over ``MAX_LINE`` (answered, then closed), a client that sends nothing for
``IDLE_TIMEOUT_S`` (closed). At most ``MAX_CONNECTIONS`` are served at once;
one more is told so and closed.

``console`` turns its connection into a raw byte stream once answered: the
partition's output flows to the client, what the client sends goes to the
partition's UART; the client detaches by closing the connection.

``commands`` adds requests served elsewhere (name -> fn(request) -> answer:
the write monitor's ``protect`` and ``violations``); each ``stat_fields``
callable adds fields to a partition's ``stat`` object.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable

from osvmm.errors import ControlError, OsvmmError, VmmBug
from osvmm.up.hostfiles import private_dir
from osvmm.up.locks import Held, LockFile
from osvmm.up.protocol import MAX_LINE, PROTOCOL_VERSION, peer_uid, send
from osvmm.vmm.console import feed_uart

MAX_CONNECTIONS = 64  # served at once; one more is answered with an error and closed
IDLE_TIMEOUT_S = 60.0  # a request line must arrive whole within this (console input aside)
SEND_TIMEOUT_S = 10.0  # an answer the client does not take in this time ends the connection
CONSOLE_POLL_S = 0.5  # how often a console connection's threads look whether it ended
ACCEPT_RETRY_S = 0.1  # after accept failed for want of a resource (file descriptors, memory)

# The requests: command -> {field: (JSON types allowed, required)}. Nothing else is
# accepted: an unknown command or field, or a field of another type, is an error.
_NAME = ((str,), True)
REQUESTS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "ps": {},
    "start": {"name": _NAME},
    "stop": {"name": _NAME},
    "restart": {"name": _NAME},
    "stat": {"name": ((str, type(None)), False)},
    "console": {"name": _NAME},
    "down": {},
}
MAX_NAME = 64  # a partition name is at most 32 characters (docs/config.md)
_JSON_TYPES = {
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true or false",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _short(text: str, limit: int = 40) -> str:
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


def parse_request(line: bytes, requests: dict | None = None) -> dict:
    """One request line to a checked request (``cmd`` and its fields, each of the
    type ``requests`` gives; REQUESTS by default), or ControlError with the
    one-line answer."""
    requests = REQUESTS if requests is None else requests
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, too deep, too many digits
        msg = None
    if not isinstance(msg, dict):
        raise ControlError("a request is one JSON object per line")
    commands = ", ".join(requests)
    cmd = msg.get("cmd")
    if not isinstance(cmd, str):
        got = "none" if "cmd" not in msg else _json_type(cmd)
        raise ControlError(f'a request needs "cmd", a string ({commands}); got {got}')
    if cmd not in requests:
        raise ControlError(f"unknown command {_short(cmd)} ({commands})")
    fields = requests[cmd]
    for key, value in msg.items():
        if key == "cmd":
            continue
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ControlError(f"{cmd}: unknown field {_short(key)} (fields: {known})")
        types, _ = fields[key]
        if type(value) not in types:
            want = " or ".join(_JSON_TYPES[t] for t in types)
            raise ControlError(f"{cmd}: {key} must be {want}, not {_json_type(value)}")
    for key, (_, required) in fields.items():
        if required and key not in msg:
            raise ControlError(f"{cmd}: needs " + ("a partition name" if key == "name" else key))
    name = msg.get("name")
    if isinstance(name, str) and len(name) > MAX_NAME:
        raise ControlError(f"{cmd}: name {_short(name)} is longer than {MAX_NAME} characters")
    return msg


class ControlServer:
    """Serves the control protocol for ``supervisor`` on the Unix socket ``path``."""

    def __init__(
        self,
        path: str,
        supervisor,
        on_down: Callable[[], None],
        commands: dict[str, Callable[[dict], dict]] | None = None,
        stat_fields: tuple[Callable[[object], dict], ...] = (),
        requests: dict | None = None,
    ):
        """``supervisor`` may be set later (``server.sup``), before ``start``;
        ``requests`` adds the rows of ``commands`` to REQUESTS (fields and types)."""
        self.path = path
        self.sup = supervisor
        self.on_down = on_down
        self.commands = dict(commands or {})
        self.stat_fields = stat_fields
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._count_lock = threading.Lock()
        self._connections = 0
        self._lock: LockFile | None = None
        self._dir_fd: int | None = None
        # The commands served and their fields: a command added to the protocol
        # adds its row here (and its handling to ``handle``).
        self.requests = dict(REQUESTS) | dict(requests or {})

    def open(self) -> None:
        """Claim ``path`` and bind it. The directory must be one only its owner can
        write (created 0700 if missing); the lock file beside the socket
        (``PATH.lock``, osvmm/up/locks.py) is held for the VMM's life, so a second
        VMM is refused while the first lives, however stalled, and the socket file
        of one that died is replaced."""
        path = self.path
        directory, base = os.path.split(os.path.abspath(path))
        dir_fd = private_dir(directory, "control_socket")
        try:
            self._lock = LockFile.acquire(dir_fd, base + ".lock", "control_socket")
        except Held as held:
            os.close(dir_fd)
            who = f"pid {held.pid}" if held.pid else "another process"
            raise ControlError(
                f"a VMM ({who}) already serves {path} (osvmm down stops it)"
            ) from None
        except BaseException:
            os.close(dir_fd)
            raise
        self._dir_fd = dir_fd
        try:
            self._bind(base)
        except BaseException:
            self.close()
            raise

    def _bind(self, base: str) -> None:
        path, dir_fd = self.path, self._dir_fd
        try:
            st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise ControlError(f"control_socket: {path} exists and is not a socket")
            if st.st_uid != os.geteuid():
                raise ControlError(
                    f"control_socket: {path} belongs to uid {st.st_uid}: not replaced"
                )
            os.unlink(base, dir_fd=dir_fd)  # we hold the lock: nobody serves it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
        except OSError as e:
            sock.close()
            raise ControlError(f"control_socket: cannot bind {path}: {e.strerror}") from None
        sock.listen(socket.SOMAXCONN)  # a burst of clients waits, not fails
        self._sock = sock

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening, remove the socket, then release the lock (in that order:
        while the lock is held, nobody else binds the path)."""
        self._closed = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
            try:
                os.unlink(os.path.basename(self.path), dir_fd=self._dir_fd)
            except OSError:
                pass
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _accept(self) -> None:
        while not self._closed and self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ECONNABORTED):
                    continue
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(ACCEPT_RETRY_S)  # out of a resource for now: not the end
                    continue
                return  # the socket was closed
            with self._count_lock:
                full = self._connections >= MAX_CONNECTIONS
                if not full:
                    self._connections += 1
            if full:
                self._refuse(conn, f"the VMM serves at most {MAX_CONNECTIONS} connections")
                continue
            try:
                threading.Thread(
                    target=self._serve, args=(conn,), name="control-conn", daemon=True
                ).start()
            except RuntimeError:  # no thread to be had: this client is refused
                self._release()
                self._refuse(conn, "the VMM cannot serve another connection now")

    def _refuse(self, conn: socket.socket, why: str) -> None:
        with conn:
            try:
                conn.setblocking(False)
                send(conn, {"ok": False, "error": why})
            except OSError:
                pass

    def _release(self) -> None:
        with self._count_lock:
            self._connections -= 1

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                if self._peer_allowed(conn):
                    self._serve_requests(conn)
        except Exception as err:  # noqa: BLE001 - a bug ends this connection, never the VMM
            self._log_bug("serving a control connection", err)
        finally:
            self._release()

    def _peer_allowed(self, conn: socket.socket) -> bool:
        """Only this VMM's user and root may drive it (SO_PEERCRED of the client)."""
        try:
            uid = peer_uid(conn)
        except OSError:
            return False
        if uid in (os.geteuid(), 0):
            return True
        self._refuse(conn, f"uid {uid} may not use this VMM (it runs as uid {os.geteuid()})")
        return False

    def _serve_requests(self, conn: socket.socket) -> None:
        buf = bytearray()
        while True:
            try:
                line = _read_line(conn, buf, time.monotonic() + IDLE_TIMEOUT_S)
            except _LineTooLong:
                self._reply(conn, {"ok": False, "error": f"a request line over {MAX_LINE} bytes"})
                return
            except OSError:  # the client went away, or sent no whole line in time
                return
            if line is None:
                return
            try:
                msg = parse_request(line, self.requests)
            except ControlError as err:
                if not self._reply(conn, {"ok": False, "error": str(err)}):
                    return
                continue
            cmd = msg["cmd"]
            if cmd == "console":
                if self._console(conn, msg, buf):
                    return  # it was a console stream until one side closed it
                continue  # refused: the connection serves requests still
            try:
                reply = self.handle(msg)
            except OsvmmError as err:
                reply = {"ok": False, "error": str(err)}
            except Exception as err:  # noqa: BLE001 - a bug: one line to the client, logged
                bug = self._log_bug(f"answering {cmd}", err)
                reply = {"ok": False, "error": str(bug)}
            if not self._reply(conn, reply):
                return
            if cmd == "down":
                self.on_down()
                return

    def _reply(self, conn: socket.socket, reply: dict) -> bool:
        """Send one answer; False when the client did not take it (gone, or not reading)."""
        try:
            conn.settimeout(SEND_TIMEOUT_S)
            send(conn, reply)
            return True
        except OSError:
            return False

    def _log_bug(self, where: str, err: BaseException) -> VmmBug:
        bug = VmmBug.from_exception(where, err)
        log = getattr(self.sup, "log", None)
        if log is not None:
            try:
                log(f"control socket: {bug}")
                log(bug.traceback_text.rstrip("\n"))
            except Exception:  # noqa: BLE001, S110 - the log must not end the connection
                pass
        return bug

    def handle(self, msg: dict) -> dict:
        """One request to its response (``console`` aside)."""
        sup = self.sup
        cmd = msg["cmd"]
        name = msg.get("name")
        if cmd == "ps":
            losses = getattr(sup, "losses", None)
            return {
                "ok": True,
                "version": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "plan": sup.plan.source,
                "log_dir": sup.log_dir,
                "partitions": [sup.describe(e) for e in sup.partitions.values()],
                "lost": losses() if losses is not None else {},
            }
        if cmd in ("start", "stop", "restart"):
            state = getattr(sup, cmd)(name)
            return {"ok": True, "name": name, "state": state, "reason": sup.entry(name).reason}
        if cmd == "stat":
            entries = [sup.entry(name)] if name else list(sup.partitions.values())
            stats = []
            for e in entries:
                fields = sup.stats(e)
                for extra in self.stat_fields:
                    fields.update(extra(e))
                stats.append(fields)
            return {"ok": True, "partitions": stats}
        if cmd == "down":
            return {"ok": True}
        if cmd in self.commands:
            return self.commands[cmd](msg)
        raise ControlError(f"{cmd}: not a request for handle()")

    def _console(self, conn: socket.socket, msg: dict, buf: bytearray) -> bool:
        """Answer ``console`` and stream; False when refused (the connection goes on)."""
        try:
            entry = self.sup.entry(msg["name"])
        except OsvmmError as err:
            return not self._reply(conn, {"ok": False, "error": str(err)})
        client = entry.console.attach()
        try:
            if not self._reply(conn, {"ok": True, "name": entry.name, "state": entry.state}):
                return True
            # Both directions share the socket: short timeouts, each side loops on them.
            conn.settimeout(CONSOLE_POLL_S)
            reader = threading.Thread(
                target=self._console_input,
                args=(conn, entry, bytes(buf), client),
                name="control-console-in",
                daemon=True,
            )
            reader.start()
            while not client.closed and not self._closed:
                data = client.take()
                view = memoryview(data)
                while view and not client.closed and not self._closed:
                    try:
                        view = view[conn.send(view) :]
                    except TimeoutError:  # a slow client: its buffer drops what overflows
                        continue
        except OSError:
            pass
        finally:
            entry.console.detach(client)
        return True

    def _console_input(self, conn: socket.socket, entry, pending: bytes, client) -> None:
        """Client bytes to the running partition's UART input FIFO (dropped when stopped)."""

        def serial_of():
            return None if client.closed else getattr(entry.partition, "serial", None)

        data = pending
        try:
            while not client.closed:
                feed_uart(serial_of, data)
                try:
                    data = conn.recv(4096)
                except TimeoutError:  # nothing typed: a console may be silent for ever
                    data = b""
                    continue
                if not data:
                    break
        except OSError:
            pass
        finally:
            client.close()


class _LineTooLong(Exception):
    pass


def _read_line(conn: socket.socket, buf: bytearray, deadline: float) -> bytes | None:
    """The next line (without its newline), None at end of file; the line must be
    whole by ``deadline`` (TimeoutError) and at most MAX_LINE bytes (_LineTooLong)."""
    while True:
        end = buf.find(b"\n")
        if end >= 0:
            line = bytes(buf[:end])
            del buf[: end + 1]
            return line
        if len(buf) > MAX_LINE:
            raise _LineTooLong
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
