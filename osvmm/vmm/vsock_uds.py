"""The host's side of a virtio-vsock device (devices/virtio/vsock.py): Unix
sockets, as Firecracker's vsock (its docs/vsock.md).

Host-initiated: a host program connects to the listening socket at PATH and
writes ``CONNECT <port>\\n``; the guest gets a REQUEST for ``port``. When the
guest accepts (RESPONSE), the program reads ``OK <host port>\\n`` (the port of
the connection's host end) and then the stream is the guest's; when the guest
refuses (RST, nothing listens on that port), the socket is closed. A line that
is no CONNECT, a port that is not a number below 2^32, a line longer than
``MAX_LINE`` or a stream that ends before it, is closed too.

Guest-initiated: a guest connect to CID 2, port P connects to the Unix socket
``PATH_P``; nothing listening there (or a full backlog: the connect does not
wait) is an RST to the guest.

``open_vsock_uds`` is step 1 of a build (inputs), before /dev/kvm is opened:
a socket file at PATH from an earlier run is replaced only when nothing
listens on it; anything else there, or a listener, is a ConfigError. The file
is removed when the device is closed (the partition ends), if it is still the
one we made.

Everything here is non-blocking and runs on the device's thread: the model
polls ``listen_fds`` and each stream's fd (vmm/virtio.py).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat

from osvmm.errors import ConfigError

MAX_LINE = 32  # "CONNECT 4294967295\n" is 19 bytes
MAX_PENDING = 64  # host connections that have not sent their line yet
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) less its NUL
PORT_SUFFIX_MAX = 11  # "_4294967295"
_CONNECT = re.compile(rb"CONNECT ([0-9]{1,10})\n")


class UdsStream:
    """One host stream of a vsock connection (an endpoint, vsock.py)."""

    def __init__(self, sock: socket.socket, host_initiated: bool, owner: set):
        self.sock = sock
        self.fd = sock.fileno()
        self.host_initiated = host_initiated
        self._owner = owner  # the backend's open streams: closed with it
        owner.add(self)

    def recv(self, n: int) -> bytes | None:
        try:
            return self.sock.recv(n)
        except (BlockingIOError, InterruptedError):
            return None

    def send(self, data: bytes) -> int:
        try:
            return self.sock.send(data, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return 0

    def established(self, host_port: int) -> None:
        """The guest accepted: a host-initiated stream hears ``OK <host port>``. The
        socket is new and empty, so the short line fits its buffer whole."""
        if self.host_initiated:
            line = f"OK {host_port}\n".encode()
            if self.sock.send(line, socket.MSG_NOSIGNAL) != len(line):
                raise BlockingIOError(errno.EAGAIN, "the OK line did not fit")

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the host end is gone: its next read or write says so

    def close(self) -> None:
        self._owner.discard(self)
        self.sock.close()


class UdsBackend:
    """The listening socket at PATH, the host connections still sending their
    CONNECT line, and guest connects to ``PATH_<port>``."""

    def __init__(self, path: str, listener: socket.socket, owns_file: bool = True):
        """``owns_file=False``: a listener another VMM handed over, whose file is not
        ours to remove until ``own_file`` (the takeover confirmed)."""
        self.path = path
        self.listener = listener
        self._identity = None
        if owns_file:
            self.own_file()
        self.pending: dict[int, tuple[socket.socket, bytearray]] = {}
        self.streams: set[UdsStream] = set()  # handed to the model, not closed yet
        self.counts = {"accepted": 0, "bad_line": 0, "too_many": 0}

    def listen_fds(self) -> list[int]:
        if self.listener is None:
            return []
        return [self.listener.fileno(), *self.pending]

    def ready(self, fd: int, revents: int) -> list[tuple[int, UdsStream]]:
        """New host connections whose CONNECT line is complete: (guest port, stream)."""
        if self.listener is not None and fd == self.listener.fileno():
            self._accept()
            return []
        if fd not in self.pending:
            return []  # closed meanwhile
        sock, line = self.pending[fd]
        try:
            # Peek, then take the line only: what follows is the guest's data.
            data = sock.recv(MAX_LINE - len(line), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        end = data.find(b"\n")
        taken = data if end < 0 else data[: end + 1]
        if taken:
            sock.recv(len(taken))
            line += taken
        if end < 0 and data and len(line) < MAX_LINE:
            return []  # more of the line to come
        del self.pending[fd]
        match = _CONNECT.fullmatch(bytes(line))
        port = int(match.group(1)) if match else -1
        if not 0 <= port <= 0xFFFFFFFF:
            self.counts["bad_line"] += 1
            sock.close()
            return []
        return [(port, UdsStream(sock, True, self.streams))]

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ECONNABORTED, EMFILE: the next one may do
            if len(self.pending) >= MAX_PENDING:
                self.counts["too_many"] += 1
                sock.close()
                continue
            sock.setblocking(False)
            self.counts["accepted"] += 1
            self.pending[sock.fileno()] = (sock, bytearray())

    def connect(self, port: int) -> UdsStream | None:
        """A stream to ``PATH_<port>``, or None when nothing takes it now."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.path}_{port}")
        except OSError:
            sock.close()
            return None
        return UdsStream(sock, False, self.streams)

    def close(self) -> None:
        """The listener and every stream closed (the device's thread has stopped)."""
        for sock, _ in self.pending.values():
            sock.close()
        self.pending = {}
        for stream in list(self.streams):
            stream.close()
        if self.listener is None:
            return
        self.unlink()
        self.listener.close()
        self.listener = None

    def own_file(self) -> None:
        """The socket file at ``path`` is this backend's: removed by ``unlink``."""
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def disown_file(self) -> None:
        """The socket file is another VMM's now (a takeover's): left where it is."""
        self._identity = None

    def stop_listening(self) -> None:
        """The listener closed and its file removed; the connections go on (a
        migration hands the path to the destination, ``listen_again`` if it fails)."""
        if self.listener is not None:
            self.unlink()
            self.listener.close()
            self.listener = None

    def listen_again(self) -> None:
        """Listen at ``path`` again after ``stop_listening`` (ConfigError if it cannot)."""
        if self.listener is None:
            fresh = open_vsock_uds(self.path, "vsock")
            self.listener, self._identity = fresh.listener, fresh._identity

    def unlink(self) -> None:
        """The socket file removed, if it is still the one we made (a process about
        to end leaves its sockets to the kernel, not its files)."""
        if self._identity is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except OSError:
            pass  # removed or replaced by someone else: theirs


def _listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(2)
    try:
        probe.connect(path)
        return True
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.ETIMEDOUT)  # a full backlog: alive
    finally:
        probe.close()


def check_uds_path(path: str, what: str = "--vsock", listener_ok: bool = False) -> bool:
    """Whether a stale socket file is at ``path`` (nothing: False); a ConfigError
    when the path cannot be ours: too long, something else there, a listener
    (unless ``listener_ok``: the VMM a partition comes from listens there)."""
    where = f"{what} uds={path}"
    if len(os.fsencode(path)) + PORT_SUFFIX_MAX > SUN_PATH_MAX:
        raise ConfigError(
            f"{where}: the path is too long for a Unix socket with a _PORT suffix "
            f"(at most {SUN_PATH_MAX - PORT_SUFFIX_MAX} bytes)"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror}") from None
    if st is None:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{where}: exists and is not a socket")
    if _listening(path):
        if listener_ok:
            return False
        raise ConfigError(f"{where}: another process listens there")
    return True


def open_vsock_uds(path: str, what: str = "--vsock") -> UdsBackend:
    """The listening socket at ``path`` (a stale one replaced), as a backend."""
    where = f"{what} uds={path}"
    if check_uds_path(path, what):
        try:
            os.unlink(path)  # stale: left by a run that ended
        except OSError as e:
            raise ConfigError(f"{where}: cannot remove the stale socket: {e.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(64)
        sock.setblocking(False)
        return UdsBackend(path, sock)
    except OSError as e:
        sock.close()
        raise ConfigError(f"{where}: cannot listen: {e.strerror}") from None
