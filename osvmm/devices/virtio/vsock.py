"""virtio-vsock (virtio 1.2 section 5.10): the device model, no I/O of its own.

Three queues: rx (0, packets to the guest), tx (1, packets from it) and event
(2: its buffers are left with the device, but for the one TRANSPORT_RESET
after a restore from a snapshot). The configuration space
is the guest's CID (le64). Stream sockets only (VIRTIO_VSOCK_TYPE_STREAM), and
only between the guest and the host (CID 2), as Firecracker's vsock.

Every packet starts with ``virtio_vsock_hdr`` (44 bytes). A connection is a
(host port, guest port) pair; its life:

    guest REQUEST  -> backend.connect(port): an endpoint, RESPONSE; none, RST
    host connects  -> (backend.ready) REQUEST to the guest: CONNECTING until the
                      guest answers RESPONSE (endpoint.established(host port))
                      or RST (the endpoint closed)
    ESTABLISHED    -> RW both ways, within credit; CREDIT_UPDATE/REQUEST
    guest SHUTDOWN -> SEND: the host's socket shut for writing once what the
                      guest sent went out; SEND and RCV: RST back, closed
    host EOF       -> SHUTDOWN (SEND: no more from the host) once what it sent
                      went out; the guest may go on sending, and closes
                      with SHUTDOWN (both), answered with RST
    RST either way -> closed at once

Credit (5.10.6.3): we advertise ``BUF_ALLOC`` bytes of buffer per connection
and count in ``fwd_cnt`` what went on to the host; what the guest sends beyond
that is a violation (RST). We send no more than the guest's buf_alloc minus
what it has not forwarded (``tx_cnt - peer fwd_cnt``): a connection without
credit is not read from on the host until a packet of the guest gives more.
A CREDIT_UPDATE goes to the guest when what it believes it may still send
falls under ``CREDIT_THRESHOLD`` and more has gone to the host since.

The backend (vmm/vsock_uds.py's UdsBackend, or a test's):

    listen_fds()           fds where host-initiated connections come in
    ready(fd, revents)     -> [(guest port, endpoint)]: new host connections
    connect(port)          -> an endpoint for a guest connect to host ``port``,
                              or None (refused)
    close()                the listener gone

and an endpoint (one host stream):

    fd                     what the device's thread polls
    recv(n)                up to n bytes; b"" at its end; None: none now
    send(data)             -> how many bytes it took now (0: full)
    established(port)      the guest accepted a host connection on host ``port``
    shutdown_write()       no more bytes for the host
    close()

``recv``/``send`` raise OSError when the host's stream breaks: RST.

Snapshots (vmm/snapshot.py): the model's state is its identity only (the
Unix socket's path, the CID, how many connections it had); connections are
not saved. A restored device starts with none and sends the driver
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (5.10.6.7), as
Firecracker does: the guest drops its connections (its programs see them
reset) and reads its CID again; new ones work as before.

Threads: everything runs on the device's thread (vmm/virtio.py): ``serve``,
``fd_ready`` and ``poll_fds``; ``reset`` under the transport's serve lock.

What the guest gets wrong costs it the packet, never the VMM: a chain shorter
than a header or than its ``len``, a tx chain with device-writable buffers
(``malformed``, dropped); a wrong source or destination CID (``bad_cid``,
dropped); an unknown op, a type other than stream, a non-RW packet with a
payload, a packet for no connection, credit overrun (answered with RST).
"""

from __future__ import annotations

import ctypes
import select
import struct
from collections import deque

from osvmm.devices.virtio import spec

RX, TX, EVENT = 0, 1, 2
QUEUE_MAX = 256
HOST_CID = spec.VMADDR_CID_HOST
MIN_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFFFFFF - 1  # U32_MAX is VMADDR_CID_ANY
BUF_ALLOC = 256 << 10  # our receive buffer per connection (Linux's default)
CREDIT_THRESHOLD = 64 << 10  # update the guest's credit when it falls under this
MAX_PAYLOAD = 64 << 10  # VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the largest RW either way
READ_AHEAD = 64 << 10  # bytes read from the host ahead of the guest's rx buffers
MAX_CONNECTIONS = 256
MAX_ORPHANS = 64  # RSTs for packets of no connection, waiting for rx buffers
FIRST_HOST_PORT = 1 << 30  # host ports of host-initiated connections (Firecracker's)
U32 = 0xFFFFFFFF

CONNECTING, ESTABLISHED, CLOSING = "connecting", "established", "closing"


class virtio_vsock_hdr(ctypes.LittleEndianStructure):
    """struct virtio_vsock_hdr (5.10.6), packed, little-endian."""

    _pack_ = 1
    _fields_ = [
        ("src_cid", ctypes.c_uint64),
        ("dst_cid", ctypes.c_uint64),
        ("src_port", ctypes.c_uint32),
        ("dst_port", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("type", ctypes.c_uint16),
        ("op", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("buf_alloc", ctypes.c_uint32),
        ("fwd_cnt", ctypes.c_uint32),
    ]


HDR_SIZE = ctypes.sizeof(virtio_vsock_hdr)
assert HDR_SIZE == 44
assert virtio_vsock_hdr.len.offset == 24 and virtio_vsock_hdr.fwd_cnt.offset == 40

KNOWN_OPS = range(spec.VIRTIO_VSOCK_OP_REQUEST, spec.VIRTIO_VSOCK_OP_CREDIT_REQUEST + 1)


class Connection:
    """One stream between a host port and a guest port."""

    def __init__(self, host_port: int, guest_port: int, endpoint, state: str):
        self.host_port, self.guest_port = host_port, guest_port
        self.endpoint = endpoint
        self.state = state
        self.peer_buf_alloc = 0  # the guest's receive buffer
        self.peer_fwd_cnt = 0  # what the guest has taken of what we sent
        self.tx_cnt = 0  # bytes sent to the guest
        self.rx_cnt = 0  # bytes received from the guest
        self.fwd_cnt = 0  # of those, bytes gone on to the host
        self.fwd_cnt_sent = 0  # fwd_cnt as the guest last heard it
        self.to_host = bytearray()
        self.to_guest = bytearray()
        self.host_eof = False  # the host will send no more
        self.guest_shut_send = False  # the guest will send no more
        self.guest_shut_rcv = False  # the guest takes no more
        self.host_shut = False  # shutdown_write() done
        # control packets owed to the guest, sent in this order
        self.want_request = state == CONNECTING
        self.want_response = False
        self.want_credit = False
        self.want_shutdown = False
        self.want_rst = False

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    def peer_credit(self) -> int:
        """Bytes the guest can take now."""
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32))

    def has_rx(self) -> bool:
        if self.want_rst or self.want_request or self.want_response or self.want_credit:
            return True
        if self.state != ESTABLISHED:
            return False
        if self.to_guest and self.peer_credit() and not self.guest_shut_rcv:
            return True
        return self.want_shutdown and not self.to_guest


class VirtioVsock:
    device_id = spec.VIRTIO_ID_VSOCK
    num_queues = 3
    queue_max = QUEUE_MAX

    def __init__(self, backend, memory, guest_cid: int):
        if not MIN_GUEST_CID <= guest_cid <= MAX_GUEST_CID:
            raise ValueError(f"guest CID {guest_cid} is not {MIN_GUEST_CID}..{MAX_GUEST_CID}")
        self.backend = backend
        self.memory = memory
        self.guest_cid = guest_cid
        self.features = spec.TRANSPORT_FEATURES
        self.config = struct.pack("<Q", guest_cid)
        self.conns: dict[tuple[int, int], Connection] = {}
        self.by_fd: dict[int, Connection] = {}
        self.orphans: deque[virtio_vsock_hdr] = deque()  # RSTs for no connection
        self._next_port = FIRST_HOST_PORT
        self.reset_owed = False  # TRANSPORT_RESET to send (restored from a snapshot)
        self.counts = dict.fromkeys(
            ("rx", "tx", "malformed", "bad_cid", "rst_sent", "refused", "dropped", "rx_short"), 0
        )

    # -- the transport's side --------------------------------------------------------
    def reset(self) -> None:
        """Every connection closed (the host sees its streams end), nothing owed."""
        for conn in list(self.conns.values()):
            self._forget(conn)
        self.orphans.clear()
        self.reset_owed = False

    def state(self) -> dict:
        """What a snapshot holds of the model: the backend's identity (the Unix
        socket's path) and the CID; the connections it had are counted, not kept."""
        return {
            "kind": "vsock",
            "uds": getattr(self.backend, "path", None),
            "cid": self.guest_cid,
            "connections": len(self.conns),
        }

    def restore(self, st: dict) -> None:
        """A restored device: no connection (the host ends were the snapshot's
        process's), and a TRANSPORT_RESET owed to the driver, so that it drops
        those it had (sent when the event queue is served: ``resume``)."""
        if st["cid"] != self.guest_cid:
            raise ValueError(f"vsock CID {st['cid']}, the device's is {self.guest_cid}")
        self.reset_owed = True

    def serve(self, index: int, queue) -> bool:
        if index == TX:
            return self._transmit(queue)
        if index == RX:
            return self._receive(queue)
        return self._event(queue)

    def _event(self, queue) -> bool:
        """The event queue: its buffers stay with the device, but for the
        TRANSPORT_RESET a restore owes (le32 id), which waits for a buffer."""
        pushed = False
        while self.reset_owed and (chain := queue.pop()) is not None:
            pushed = True
            if chain.readable or chain.writable_len < 4:  # no room for it: returned empty
                self.counts["malformed"] += 1
                queue.push(chain.head, 0)
                continue
            event = struct.pack("<I", spec.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
            queue.push(chain.head, chain.write(self.memory, 0, event))
            self.reset_owed = False
        return pushed and queue.needs_interrupt()

    def wanted_queues(self) -> tuple[int, ...]:
        """Queues with work for the device besides what the driver notified."""
        if self.orphans or any(c.has_rx() for c in self.conns.values()):
            return (RX,)
        return ()

    def poll_fds(self) -> dict[int, int]:
        """fds the device's thread polls (with events) for this device now."""
        fds = dict.fromkeys(self.backend.listen_fds(), select.POLLIN)
        for fd, conn in self.by_fd.items():
            events = select.POLLOUT if conn.to_host else 0
            if conn.state == ESTABLISHED and not conn.host_eof and self._read_room(conn) > 0:
                events |= select.POLLIN
            if events:
                fds[fd] = events
        return fds

    def fd_ready(self, fd: int, revents: int) -> tuple[int, ...]:
        """An fd of ``poll_fds`` is ready: take what it has; the queues to serve."""
        conn = self.by_fd.get(fd)
        if conn is None:
            for guest_port, endpoint in self.backend.ready(fd, revents):
                self._host_connect(guest_port, endpoint)
        else:
            if revents & (select.POLLOUT | select.POLLERR | select.POLLHUP) and conn.to_host:
                self._flush(conn)
            readable = select.POLLIN | select.POLLHUP | select.POLLERR
            if conn.key in self.conns and revents & readable:
                self._read_host(conn)
        return self.wanted_queues()

    # -- host side ------------------------------------------------------------------
    def _host_connect(self, guest_port: int, endpoint) -> None:
        if len(self.conns) >= MAX_CONNECTIONS:
            self.counts["refused"] += 1
            endpoint.close()
            return
        host_port = self._free_port()
        conn = Connection(host_port, guest_port, endpoint, CONNECTING)
        self.conns[conn.key] = conn
        self.by_fd[endpoint.fd] = conn

    def _free_port(self) -> int:
        used = {c.host_port for c in self.conns.values()}
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < U32 - 1 else FIRST_HOST_PORT
            if port not in used:
                return port

    def _read_room(self, conn: Connection) -> int:
        if conn.guest_shut_rcv:
            return 0
        return min(conn.peer_credit(), READ_AHEAD) - len(conn.to_guest)

    def _read_host(self, conn: Connection) -> None:
        if conn.endpoint is None or conn.state != ESTABLISHED:
            return
        room = self._read_room(conn)
        if room <= 0 or conn.host_eof:
            return
        try:
            data = conn.endpoint.recv(room)
        except OSError:
            self._reset(conn)
            return
        if data is None:
            return
        if not data:
            conn.host_eof = True
            conn.want_shutdown = True
            return
        conn.to_guest += data

    def _flush(self, conn: Connection) -> None:
        """What the guest sent, on to the host as far as it takes it now."""
        if conn.endpoint is None:
            return
        while conn.to_host:
            try:
                n = conn.endpoint.send(bytes(conn.to_host[:MAX_PAYLOAD]))
            except OSError:
                self._reset(conn)
                return
            if not n:
                break
            del conn.to_host[:n]
            conn.fwd_cnt = (conn.fwd_cnt + n) & U32
        believed = BUF_ALLOC - ((conn.rx_cnt - conn.fwd_cnt_sent) & U32)
        if conn.fwd_cnt != conn.fwd_cnt_sent and believed < CREDIT_THRESHOLD:
            conn.want_credit = True
        if not conn.to_host:
            self._after_flush(conn)

    def _after_flush(self, conn: Connection) -> None:
        if conn.state == CLOSING and conn.guest_shut_send and conn.guest_shut_rcv:
            if not conn.want_rst:
                self._forget(conn)  # the guest's RST went out: nothing left
            return
        if conn.guest_shut_send and not conn.host_shut:
            conn.host_shut = True
            conn.endpoint.shutdown_write()

    def _reset(self, conn: Connection) -> None:
        """The host's stream broke (or the connection is refused): RST to the guest."""
        conn.state = CLOSING
        conn.want_request = conn.want_response = conn.want_credit = False
        conn.want_shutdown = False
        conn.want_rst = True
        conn.to_guest.clear()
        conn.to_host.clear()
        self._drop_endpoint(conn)

    def _drop_endpoint(self, conn: Connection) -> None:
        if conn.endpoint is not None:
            self.by_fd.pop(conn.endpoint.fd, None)
            conn.endpoint.close()
            conn.endpoint = None

    def _forget(self, conn: Connection) -> None:
        self._drop_endpoint(conn)
        self.conns.pop(conn.key, None)

    # -- tx: packets from the guest ---------------------------------------------------
    def _transmit(self, queue) -> bool:
        pushed = False
        while (chain := queue.pop()) is not None:
            self._packet(chain)
            queue.push(chain.head, 0)
            pushed = True
        return pushed and queue.needs_interrupt()

    def _packet(self, chain) -> None:
        if chain.writable or chain.readable_len < HDR_SIZE:
            self.counts["malformed"] += 1
            return
        hdr = virtio_vsock_hdr.from_buffer_copy(chain.read(self.memory, 0, HDR_SIZE))
        if hdr.len > chain.readable_len - HDR_SIZE or hdr.len > MAX_PAYLOAD:
            self.counts["malformed"] += 1
            return
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != HOST_CID:
            self.counts["bad_cid"] += 1
            return
        self.counts["tx"] += 1
        op = hdr.op
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if (
            hdr.type != spec.VIRTIO_VSOCK_TYPE_STREAM
            or op not in KNOWN_OPS
            or (hdr.len and op != spec.VIRTIO_VSOCK_OP_RW)
        ):
            self.counts["malformed"] += 1
            if op != spec.VIRTIO_VSOCK_OP_RST:
                if conn is not None:
                    self._reset(conn)
                else:
                    self._orphan_rst(hdr)
            return
        if op == spec.VIRTIO_VSOCK_OP_RST:
            if conn is not None:
                self._forget(conn)
            return
        if conn is None:
            if op == spec.VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connect(hdr)
            else:
                self._orphan_rst(hdr)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if conn.state == CLOSING:
            return  # an RST is on its way
        if op == spec.VIRTIO_VSOCK_OP_RESPONSE and conn.state == CONNECTING:
            conn.state = ESTABLISHED
            conn.want_request = False
            try:
                conn.endpoint.established(conn.host_port)
            except OSError:
                self._reset(conn)
                return
            self._read_host(conn)  # what the host sent after its CONNECT line
        elif conn.state != ESTABLISHED:
            self._reset(conn)  # anything but RESPONSE (or RST) to our REQUEST
        elif op == spec.VIRTIO_VSOCK_OP_RW:
            self._guest_data(conn, chain, hdr.len)
        elif op == spec.VIRTIO_VSOCK_OP_SHUTDOWN:
            self._guest_shutdown(conn, hdr.flags)
        elif op == spec.VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            conn.want_credit = True
        elif op == spec.VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            pass  # the credit is taken from every packet, above
        else:  # REQUEST or RESPONSE on an established connection
            self._reset(conn)

    def _guest_connect(self, hdr: virtio_vsock_hdr) -> None:
        if len(self.conns) >= MAX_CONNECTIONS:
            self.counts["refused"] += 1
            self._orphan_rst(hdr)
            return
        try:
            endpoint = self.backend.connect(hdr.dst_port)
        except OSError:
            endpoint = None
        if endpoint is None:
            self.counts["refused"] += 1
            self._orphan_rst(hdr)
            return
        conn = Connection(hdr.dst_port, hdr.src_port, endpoint, ESTABLISHED)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        conn.want_response = True
        self.conns[conn.key] = conn
        self.by_fd[endpoint.fd] = conn

    def _guest_data(self, conn: Connection, chain, length: int) -> None:
        if conn.guest_shut_send:
            self._reset(conn)
            return
        if length > BUF_ALLOC - len(conn.to_host):
            self.counts["malformed"] += 1  # beyond the credit we gave
            self._reset(conn)
            return
        if not length:
            return
        conn.to_host += chain.read(self.memory, HDR_SIZE, length)
        conn.rx_cnt = (conn.rx_cnt + length) & U32
        self._flush(conn)

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        conn.guest_shut_rcv |= bool(flags & spec.VIRTIO_VSOCK_SHUTDOWN_RCV)
        conn.guest_shut_send |= bool(flags & spec.VIRTIO_VSOCK_SHUTDOWN_SEND)
        if conn.guest_shut_rcv:
            conn.to_guest.clear()
        if conn.guest_shut_send and conn.guest_shut_rcv:
            # Linux closes a socket so and waits for our RST; what it sent before
            # still goes to the host (the endpoint kept until it is flushed).
            conn.state = CLOSING
            conn.want_credit = conn.want_shutdown = False
            conn.want_rst = True
        if not conn.to_host:
            self._after_flush(conn)

    def _orphan_rst(self, hdr: virtio_vsock_hdr) -> None:
        if len(self.orphans) >= MAX_ORPHANS:
            self.counts["dropped"] += 1
            return
        self.orphans.append(hdr)

    # -- rx: packets to the guest ------------------------------------------------------
    def _receive(self, queue) -> bool:
        pushed = False
        while self.orphans or any(c.has_rx() for c in self.conns.values()):
            chain = queue.pop()
            if chain is None:
                break
            pushed = True
            room = chain.writable_len - HDR_SIZE
            if chain.readable or room < 0:
                self.counts["rx_short"] += 1
                queue.push(chain.head, 0)
                continue
            hdr, payload = self._next_packet(room)
            chain.write(self.memory, 0, bytes(hdr))
            if payload:
                chain.write(self.memory, HDR_SIZE, payload)
            queue.push(chain.head, HDR_SIZE + len(payload))
            self.counts["rx"] += 1
        return pushed and queue.needs_interrupt()

    def _next_packet(self, room: int) -> tuple[virtio_vsock_hdr, bytes]:
        """The next packet owed to the guest (there is one), its payload up to ``room``."""
        if self.orphans:
            got = self.orphans.popleft()
            self.counts["rst_sent"] += 1
            return self._header(got.dst_port, got.src_port, spec.VIRTIO_VSOCK_OP_RST), b""
        conn = next(c for c in self.conns.values() if c.has_rx())
        # round robin: the connection served goes to the end of the table
        del self.conns[conn.key]
        self.conns[conn.key] = conn
        op, flags, payload = self._conn_packet(conn, room)
        hdr = self._header(conn.host_port, conn.guest_port, op, flags, len(payload))
        hdr.fwd_cnt = conn.fwd_cnt
        conn.fwd_cnt_sent = conn.fwd_cnt
        if op == spec.VIRTIO_VSOCK_OP_RST:
            self.counts["rst_sent"] += 1
            if conn.to_host and conn.endpoint is not None:
                return hdr, payload  # kept until what the guest sent is flushed
            self._forget(conn)
        return hdr, payload

    def _conn_packet(self, conn: Connection, room: int) -> tuple[int, int, bytes]:
        if conn.want_rst:
            conn.want_rst = False
            return spec.VIRTIO_VSOCK_OP_RST, 0, b""
        if conn.want_request:
            conn.want_request = False
            return spec.VIRTIO_VSOCK_OP_REQUEST, 0, b""
        if conn.want_response:
            conn.want_response = False
            return spec.VIRTIO_VSOCK_OP_RESPONSE, 0, b""
        if conn.to_guest and conn.peer_credit() and not conn.guest_shut_rcv and room > 0:
            n = min(len(conn.to_guest), room, conn.peer_credit(), MAX_PAYLOAD)
            payload = bytes(conn.to_guest[:n])
            del conn.to_guest[:n]
            conn.tx_cnt = (conn.tx_cnt + n) & U32
            conn.want_credit = False  # every packet carries our credit
            return spec.VIRTIO_VSOCK_OP_RW, 0, payload
        if conn.want_credit:
            conn.want_credit = False
            return spec.VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, b""
        if conn.to_guest and room <= 0:
            # a chain with room for a header only: spend it on our credit
            return spec.VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, b""
        # The host's end of the stream: the guest reads to its end and may go on
        # sending (a half-close); it closes with SHUTDOWN (both), answered with RST.
        conn.want_shutdown = False
        return spec.VIRTIO_VSOCK_OP_SHUTDOWN, spec.VIRTIO_VSOCK_SHUTDOWN_SEND, b""

    def _header(self, src_port: int, dst_port: int, op: int, flags: int = 0, length: int = 0):
        return virtio_vsock_hdr(
            src_cid=HOST_CID,
            dst_cid=self.guest_cid,
            src_port=src_port,
            dst_port=dst_port,
            len=length,
            type=spec.VIRTIO_VSOCK_TYPE_STREAM,
            op=op,
            flags=flags,
            buf_alloc=BUF_ALLOC,
            fwd_cnt=0,
        )
