"""The VMM's side of the control socket (docs/control-socket.md).

``ControlServer(path, supervisor, on_down)`` answers ``ps``, ``start``,
``stop``, ``restart``, ``stat``, ``console`` and ``down``, one thread per
connection; the framing is osvmm/up/protocol.py's.

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
from collections.abc import Callable

from osvmm.errors import ControlError, OsvmmError
from osvmm.up.protocol import PROTOCOL_VERSION, is_listening, read_line, send
from osvmm.vmm.console import feed_uart


class ControlServer:
    """Serves the control protocol for ``supervisor`` on the Unix socket ``path``."""

    def __init__(
        self,
        path: str,
        supervisor,
        on_down: Callable[[], None],
        commands: dict[str, Callable[[dict], dict]] | None = None,
        stat_fields: tuple[Callable[[object], dict], ...] = (),
    ):
        self.path = path
        self.sup = supervisor
        self.on_down = on_down
        self.commands = dict(commands or {})
        self.stat_fields = stat_fields
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def open(self) -> None:
        """Bind the socket; a stale socket file (nobody listening) is replaced."""
        path = self.path
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ControlError(f"control_socket: {path} exists and is not a socket")
            if is_listening(path):
                raise ControlError(f"a VMM is already listening on {path} (osvmm down stops it)")
            os.unlink(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise ControlError(f"control_socket: cannot bind {path}: {e.strerror}") from None
        os.chmod(path, 0o600)
        sock.listen(16)
        self._sock = sock

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed and self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ECONNABORTED):
                    continue
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="control-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            while True:
                try:
                    line = read_line(conn, buf)
                except (OSError, ControlError):
                    return
                if line is None:
                    return
                try:
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        raise ValueError
                except ValueError:
                    send(conn, {"ok": False, "error": "a request is one JSON object per line"})
                    continue
                cmd = msg.get("cmd")
                if cmd == "console":
                    self._console(conn, msg, buf)
                    return
                try:
                    reply = self.handle(msg)
                except OsvmmError as err:
                    reply = {"ok": False, "error": str(err)}
                try:
                    send(conn, reply)
                except OSError:
                    return
                if cmd == "down":
                    self.on_down()
                    return

    def handle(self, msg: dict) -> dict:
        """One request to its response (``console`` aside)."""
        sup = self.sup
        cmd = msg.get("cmd")
        name = msg.get("name")
        if cmd in ("start", "stop", "restart", "console") and not isinstance(name, str):
            raise ControlError(f"{cmd}: needs a partition name")
        if cmd == "ps":
            return {
                "ok": True,
                "version": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "plan": sup.plan.source,
                "log_dir": sup.log_dir,
                "partitions": [sup.describe(e) for e in sup.partitions.values()],
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
        known = ", ".join(
            ("ps", "start", "stop", "restart", "stat", "console", "down", *self.commands)
        )
        raise ControlError(f"unknown command {cmd!r} ({known})")

    def _console(self, conn: socket.socket, msg: dict, buf: bytearray) -> None:
        try:
            entry = self.sup.entry(msg.get("name"))
        except OsvmmError as err:
            send(conn, {"ok": False, "error": str(err)})
            return
        client = entry.console.attach()
        send(conn, {"ok": True, "name": entry.name, "state": entry.state})
        pending = bytes(buf)
        reader = threading.Thread(
            target=self._console_input, args=(conn, entry, pending, client), daemon=True
        )
        reader.start()
        try:
            while not client.closed:
                data = client.take()
                if data:
                    conn.sendall(data)
        except OSError:
            pass
        finally:
            entry.console.detach(client)

    def _console_input(self, conn: socket.socket, entry, pending: bytes, client) -> None:
        """Client bytes to the running partition's UART input FIFO (dropped when stopped)."""

        def serial_of():
            return getattr(entry.partition, "serial", None)

        data = pending
        try:
            while True:
                feed_uart(serial_of, data)
                data = conn.recv(4096)
                if not data:
                    break
        except OSError:
            pass
        finally:
            client.close()
