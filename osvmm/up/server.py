"""The VMM's side of the control socket: HTTP/1.1 with JSON (docs/api.md; the
routes are osvmm/up/api.py's ``Route``s, the framing osvmm/up/http.py's).

``ControlServer(path, supervisor, on_down)`` serves ``CORE_ROUTES`` (the VMM,
the partitions, their lifecycle and statistics, the console, ``down`` and
``/metrics``), plus the ``routes`` other services add (snapshots, migration,
the write monitor), one thread per connection.

Every request is checked against its route (path, method, body fields and
their JSON types, query parameters) before anything acts on it; anything else
is answered with a status and a one-line JSON error, and nothing a client
sends can end a connection's thread other than by closing it: malformed HTTP
or JSON, deep nesting, invalid UTF-8, a head over ``http.MAX_HEAD`` or a body
over ``http.MAX_BODY`` (answered, then closed), a request not whole within
``IDLE_TIMEOUT_S`` of the last answer (closed; 408 if it had begun). At most
``MAX_CONNECTIONS`` are served at once; one more is answered 503 and closed.
An answer the client does not take within ``SEND_TIMEOUT_S`` ends its
connection, never another's.

The console route upgrades its connection (``101 Switching Protocols``,
``Upgrade: tcp``, as Docker's attach) to a raw byte stream: the partition's
output flows to the client, what the client sends goes to the partition's
UART; the client detaches by closing the connection.

``stat_fields`` callables add fields to a partition's statistics object;
``metric_sources`` add metric families to ``/metrics`` (osvmm/up/metrics.py).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import stat
import threading
import time
from collections.abc import Callable

from osvmm.errors import ConfigError, ControlError, OsvmmError, VmmBug, WrongState
from osvmm.up import http
from osvmm.up.api import API_VERSION, ApiError, Raw, Route, check, match, status_of
from osvmm.up.hostfiles import private_dir
from osvmm.up.locks import Held, LockFile
from osvmm.up.protocol import peer_uid
from osvmm.vmm.console import feed_uart

MAX_CONNECTIONS = 64  # served at once; one more is answered with an error and closed
IDLE_TIMEOUT_S = 60.0  # a request line must arrive whole within this (console input aside)
SEND_TIMEOUT_S = 10.0  # an answer the client does not take in this time ends the connection
CONSOLE_POLL_S = 0.5  # how often a console connection's threads look whether it ended
ACCEPT_RETRY_S = 0.1  # after accept failed for want of a resource (file descriptors, memory)

CONSOLE_UPGRADE = "tcp"  # the Upgrade protocol of a console stream (as Docker's attach)


def core_routes(server: ControlServer) -> list[Route]:
    """The routes the control server answers itself (docs/openapi.yaml)."""
    p = "/v1/partitions/{name}"
    return [
        Route("GET", "/v1/vmm", "getVmm", server.vmm),
        Route("GET", "/v1/partitions", "listPartitions", server.list_partitions),
        Route("GET", p, "getPartition", server.get_partition),
        Route(
            "POST",
            p + "/start",
            "startPartition",
            server.start_partition,
            {"restore": ((str,), False)},
        ),
        Route("POST", p + "/stop", "stopPartition", server.lifecycle("stop")),
        Route("POST", p + "/restart", "restartPartition", server.lifecycle("restart")),
        Route("GET", "/v1/stat", "getStat", server.stat),
        Route("GET", p + "/stat", "getPartitionStat", server.stat),
        Route("POST", p + "/console", "attachConsole"),
        Route("POST", "/v1/down", "down", lambda msg: {}),
        Route("GET", "/metrics", "getMetrics", server.metrics),
    ]


class ControlServer:
    """Serves the control API for ``supervisor`` on the Unix socket ``path``."""

    def __init__(
        self,
        path: str,
        supervisor,
        on_down: Callable[[], None],
        routes: list[Route] | None = None,
        stat_fields: tuple[Callable[[object], dict], ...] = (),
        group: str | None = None,
        listen: tuple[str, int] | None = None,
        token: str | None = None,
    ):
        """``supervisor`` may be set later (``server.sup``), before ``start``;
        ``routes`` adds to the core routes (``add_routes`` too). ``group``: the
        socket is this group's too (mode 0660), and its members may use it.
        ``listen``: (host, port) of a TCP listener too, whose every request must
        carry ``Authorization: Bearer TOKEN`` (``token``, required with it)."""
        if listen is not None and not token:
            raise ControlError("a TCP listener of the control API needs a token")
        self.path = path
        self.sup = supervisor
        self.on_down = on_down
        self.stat_fields = stat_fields
        self.metric_sources: list[Callable[[], list]] = []
        self.group = group
        self._gid: int | None = None
        self._sock: socket.socket | None = None
        self.listen = listen
        self._token = f"Bearer {token}".encode() if token else None
        self._tcp: socket.socket | None = None
        self.tcp_address: tuple[str, int] | None = None  # where the TCP listener is bound
        self._thread: threading.Thread | None = None
        self._closed = False
        self._count_lock = threading.Lock()
        self._connections = 0
        self._lock: LockFile | None = None
        self._dir_fd: int | None = None
        self.routes: list[Route] = core_routes(self)
        self.add_routes(routes or [])

    def add_routes(self, routes: list[Route]) -> None:
        for route in routes:
            clash = [r for r in self.routes if (r.method, r.path) == (route.method, route.path)]
            if clash:
                raise VmmBug(f"route {route.method} {route.path} served twice")
            self.routes.append(route)

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
            if self.listen is not None:
                self._bind_tcp(*self.listen)
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
        gid = self._group_id()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            if gid is not None:  # the group's too: the socket, and a way through its directory
                os.chown(path, -1, gid)
                os.chmod(path, 0o660)
                st = os.fstat(dir_fd)
                if st.st_uid == os.geteuid() and (st.st_gid != gid or not st.st_mode & 0o010):
                    os.fchown(dir_fd, -1, gid)
                    os.fchmod(dir_fd, stat.S_IMODE(st.st_mode) | 0o010)
        except OSError as e:
            sock.close()
            raise ControlError(f"control_socket: cannot bind {path}: {e.strerror}") from None
        self._gid = gid
        sock.listen(socket.SOMAXCONN)  # a burst of clients waits, not fails
        self._sock = sock

    def _group_id(self) -> int | None:
        if self.group is None:
            return None
        import grp

        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise ControlError(f"control socket group {self.group!r}: no such group") from None

    def _bind_tcp(self, host: str, port: int) -> None:
        try:
            sock = socket.create_server((host, port), reuse_port=False, backlog=socket.SOMAXCONN)
        except OSError as e:
            raise ControlError(f"--listen {host}:{port}: {e.strerror or e}") from None
        self._tcp = sock
        self.tcp_address = sock.getsockname()[:2]

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._accept, args=(self._sock, False), name="control", daemon=True
        )
        self._thread.start()
        if self._tcp is not None:
            threading.Thread(
                target=self._accept, args=(self._tcp, True), name="control-tcp", daemon=True
            ).start()

    def close(self) -> None:
        """Stop listening, remove the socket, then release the lock (in that order:
        while the lock is held, nobody else binds the path)."""
        self._closed = True
        if self._tcp is not None:
            try:
                self._tcp.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._tcp.close()
            self._tcp = None
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

    def _accept(self, listener: socket.socket, tcp: bool) -> None:
        while not self._closed:
            try:
                conn, _ = listener.accept()
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
                self._refuse(conn, 503, f"the VMM serves at most {MAX_CONNECTIONS} connections")
                continue
            try:
                threading.Thread(
                    target=self._serve, args=(conn, tcp), name="control-conn", daemon=True
                ).start()
            except RuntimeError:  # no thread to be had: this client is refused
                self._release()
                self._refuse(conn, 503, "the VMM cannot serve another connection now")

    def _refuse(self, conn: socket.socket, status: int, why: str) -> None:
        with conn:
            try:
                conn.setblocking(False)
                conn.sendall(http.error_response(status, why, close=True))
            except OSError:
                pass

    def _release(self) -> None:
        with self._count_lock:
            self._connections -= 1

    def _serve(self, conn: socket.socket, tcp: bool = False) -> None:
        try:
            with conn:
                if tcp:  # no credentials to read: each request shows the token
                    self._serve_requests(conn, self._token)
                elif self._peer_allowed(conn):
                    self._serve_requests(conn)
        except Exception as err:  # noqa: BLE001 - a bug ends this connection, never the VMM
            self._log_bug("serving a control connection", err)
        finally:
            self._release()

    def _peer_allowed(self, conn: socket.socket) -> bool:
        """Only this VMM's user, root, and the members of ``group`` may drive it
        (SO_PEERCRED of the client; its supplementary groups from /proc)."""
        try:
            uid = peer_uid(conn)
        except OSError:
            return False
        if uid in (os.geteuid(), 0) or (self._gid is not None and self._in_group(conn)):
            return True
        self._refuse(conn, 403, f"uid {uid} may not use this VMM (it runs as uid {os.geteuid()})")
        return False

    def _in_group(self, conn: socket.socket) -> bool:
        from osvmm.up.protocol import peer_groups

        try:
            return self._gid in peer_groups(conn)
        except OSError:
            return False

    def _serve_requests(self, conn: socket.socket, token: bytes | None = None) -> None:
        """Requests until the client closes, or its framing is lost; with ``token``
        each must carry it (``Authorization: Bearer TOKEN``), else 401."""
        buf = bytearray()
        while True:
            try:
                req = http.read_request(conn, buf, time.monotonic() + IDLE_TIMEOUT_S)
            except http.HttpError as err:  # its framing is lost: answered, then closed
                self._send(conn, http.error_response(err.status, str(err), close=True))
                return
            except TimeoutError:
                if buf:  # a request begun and not finished in time
                    self._send(conn, http.error_response(408, "a request not whole in time", True))
                return
            except OSError:  # the client went away
                return
            if req is None:
                return
            keep = req.keep_alive
            route = None
            if token is not None and not _authorized(req, token):
                answer = http.error_response(
                    401,
                    "a request on TCP needs Authorization: Bearer TOKEN (the VMM's token)",
                    not keep,
                    (("WWW-Authenticate", 'Bearer realm="osvmm"'),),
                )
                if not self._send(conn, answer) or not keep:
                    return
                continue
            try:
                route, params = match(self.routes, req.method, req.path)
                msg = check(route, params, req.body, req.query)
                if route.operation == "attachConsole":
                    if self._console(conn, req, msg, buf):
                        return  # it was a console stream until one side closed it
                    continue
                answer = self._answer(route.handler(msg), close=not keep)
            except OsvmmError as err:
                extra = (("Allow", err.allow),) if getattr(err, "allow", None) else ()
                answer = http.error_response(status_of(err), str(err), not keep, extra)
            except Exception as err:  # noqa: BLE001 - a bug: one line to the client, logged
                what = route.operation if route is not None else req.path
                bug = self._log_bug(f"answering {what}", err)
                answer = http.error_response(500, str(bug), not keep)
            if not self._send(conn, answer):
                return
            if (
                route is not None
                and route.operation == "down"
                and answer.startswith(b"HTTP/1.1 200")
            ):
                self.on_down()
                return
            if not keep:
                return

    @staticmethod
    def _answer(result, close: bool) -> bytes:
        if isinstance(result, Raw):
            return http.response(200, result.body, result.content_type, close)
        return http.json_response(200, result, close)

    def _send(self, conn: socket.socket, data: bytes) -> bool:
        """Send one answer; False when the client did not take it (gone, or not reading)."""
        try:
            conn.settimeout(SEND_TIMEOUT_S)
            conn.sendall(data)
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

    # -- the core routes --------------------------------------------------------------------
    def vmm(self, msg: dict) -> dict:
        sup = self.sup
        losses = getattr(sup, "losses", None)
        return {
            "version": API_VERSION,
            "pid": os.getpid(),
            "plan": sup.plan.source,
            "log_dir": sup.log_dir,
            "partitions": [sup.describe(e) for e in list(sup.partitions.values())],
            "lost": losses() if losses is not None else {},
        }

    def list_partitions(self, msg: dict) -> dict:
        return {"partitions": [self.sup.describe(e) for e in list(self.sup.partitions.values())]}

    def get_partition(self, msg: dict) -> dict:
        return self.sup.describe(self.sup.entry(msg["name"]))

    def start_partition(self, msg: dict) -> dict:
        """Boot a stopped partition; with ``restore`` (an absolute directory), resume
        that snapshot instead, this once (docs/snapshots.md), the snapshot read and
        checked against the partition first (up/partition_config.py check_restore:
        its machine, NICs, networks and vsock; its disks at the build)."""
        name, restore = msg["name"], msg.get("restore")
        if restore is not None:
            from osvmm.up.partition_config import check_restore

            if not os.path.isabs(restore):
                raise ControlError("startPartition: restore needs an absolute directory")
            entry = self.sup.entry(name)
            if entry.want_running:
                raise WrongState(f"partition {name!r} is already {entry.state}")
            try:
                check_restore(self.sup.assignment, entry.placement, entry.machine, restore)
            except OsvmmError as err:
                raise ConfigError(f"partition {name!r}: {err}") from None
        state = self.sup.start(name, **({"restore": restore} if restore is not None else {}))
        return {"name": name, "state": state, "reason": self.sup.entry(name).reason}

    def lifecycle(self, verb: str) -> Callable[[dict], dict]:
        def act(msg: dict) -> dict:
            name = msg["name"]
            state = getattr(self.sup, verb)(name)
            return {"name": name, "state": state, "reason": self.sup.entry(name).reason}

        return act

    def stat(self, msg: dict) -> dict:
        sup = self.sup
        name = msg.get("name")
        entries = [sup.entry(name)] if name is not None else list(sup.partitions.values())
        stats = []
        for e in entries:
            fields = sup.stats(e)
            for extra in self.stat_fields:
                fields.update(extra(e))
            stats.append(fields)
        return stats[0] if name is not None else {"partitions": stats}

    def metrics(self, msg: dict) -> Raw:
        from osvmm.up.metrics import CONTENT_TYPE, render

        return Raw(CONTENT_TYPE, render(self.sup, self.stat_fields, self.metric_sources))

    # -- the console ------------------------------------------------------------------------
    def _console(self, conn: socket.socket, req, msg: dict, buf: bytearray) -> bool:
        """Upgrade to a console stream; False when refused (the connection goes on)."""
        if req.upgrade() != CONSOLE_UPGRADE:
            raise ApiError(
                400,
                f"attachConsole: needs Connection: Upgrade and Upgrade: {CONSOLE_UPGRADE}",
            )
        entry = self.sup.entry(msg["name"])
        client = entry.console.attach()
        try:
            head = http.response(
                101,
                extra=(
                    ("Connection", "Upgrade"),
                    ("Upgrade", CONSOLE_UPGRADE),
                    ("Osvmm-Partition", entry.name),
                    ("Osvmm-State", entry.state),
                ),
            )
            if not self._send(conn, head):
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
            # Output that finds nothing waiting goes out on the partition's own thread,
            # without blocking (the socket has a timeout, so its descriptor is
            # non-blocking); the rest, and what would block, is sent from here.
            fd = conn.fileno()
            client.direct = functools.partial(os.write, fd)
            while not client.closed and not self._closed:
                data = client.take()
                view = memoryview(data)
                while view and not client.closed and not self._closed:
                    try:
                        view = view[conn.send(view) :]
                    except TimeoutError:  # a slow client: its buffer drops what overflows
                        continue
                client.taken()
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


def _authorized(req, token: bytes) -> bool:
    """The request's Authorization header is the token (compared in constant time)."""
    import hmac

    given = req.headers.get("authorization", "").encode("ascii", "replace")
    return hmac.compare_digest(given, token)
