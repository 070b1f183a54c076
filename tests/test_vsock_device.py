"""virtio-vsock as vmm/virtio.py runs it: the device's thread polls the queues'
eventfds and the sockets the model asks for, through the virtio-mmio transport
as Linux's driver sets it up; a stand-in VM takes the ioeventfds and irqfd.
Host connects over the Unix socket and the guest's answers travel the whole
path; before the driver is ready the listener is not served."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from osvmm.devices.virtio import spec
from osvmm.devices.virtio.vsock import FIRST_HOST_PORT, HDR_SIZE, virtio_vsock_hdr
from osvmm.vmm.virtio import VirtioDevices
from osvmm.vmm.vsock_uds import open_vsock_uds
from tests.test_virtio_vsock import CID, NAME, OP, RX_BUF
from tests.virtio_driver import Driver, memory

QUEUES = {  # index: (size, desc, avail, used)
    0: (16, 0x1000, 0x2000, 0x3000),
    1: (8, 0x4000, 0x5000, 0x6000),
    2: (4, 0x7000, 0x7800, 0x8000),
}


class StandInVm:
    fd = 3

    def __init__(self):
        self.irqfds = []

    def irqfd(self, fd, gsi, deassign=False):
        self.irqfds.append((fd, gsi, deassign))

    def ioeventfd(self, fd, addr, size, datamatch=None, deassign=False):
        pass


class StandInBus:
    def register(self, base, size, device):
        self.device = device


@pytest.fixture
def device(tmp_path):
    mem = memory(4 << 20)
    path = str(tmp_path / "v.sock")
    devices = VirtioDevices()
    errors = []
    dev = devices.add_vsock(
        StandInVm(), mem, StandInBus(), open_vsock_uds(path), CID, errors.append
    )
    devices.start("t")
    yield dev, mem, path, errors
    devices.close()
    mem.close()
    assert not os.path.exists(path)


def w(dev, off, value):
    dev.transport.mmio_write(off, struct.pack("<I", value))


def set_up(dev, mem):
    """Linux's probe: features, the three queues, DRIVER_OK; rx buffers given."""
    w(dev, spec.STATUS, spec.ACKNOWLEDGE | spec.DRIVER)
    w(dev, spec.DRIVER_FEATURES_SEL, 1)
    w(dev, spec.DRIVER_FEATURES, 1)  # VIRTIO_F_VERSION_1
    w(dev, spec.STATUS, spec.ACKNOWLEDGE | spec.DRIVER | spec.FEATURES_OK)
    drivers = {}
    for index, (size, desc, avail, used) in QUEUES.items():
        w(dev, spec.QUEUE_SEL, index)
        w(dev, spec.QUEUE_NUM, size)
        w(dev, spec.QUEUE_DESC_LOW, desc)
        w(dev, spec.QUEUE_DRIVER_LOW, avail)
        w(dev, spec.QUEUE_DEVICE_LOW, used)
        w(dev, spec.QUEUE_READY, 1)
        drivers[index] = Driver(mem, size, desc, avail, used)
    w(dev, spec.STATUS, spec.ACKNOWLEDGE | spec.DRIVER | spec.FEATURES_OK | spec.DRIVER_OK)
    rx = drivers[0]
    for head in range(16):
        rx.chain([(0x100000 + head * 0x2000, RX_BUF, True)], first=head)
        rx.make_available(head)
    w(dev, spec.QUEUE_NOTIFY, 0)
    return drivers


def wait_rx(drivers, mem, timeout=5.0):
    """The next packet the device's thread put in an rx buffer."""
    rx = drivers[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        used = rx.take_used()
        if used:
            [(head, written)] = used
            raw = mem.read(0x100000 + head * 0x2000, written)
            rx.make_available(head)
            return virtio_vsock_hdr.from_buffer_copy(raw[:HDR_SIZE]), raw[HDR_SIZE:]
        time.sleep(0.01)
    raise AssertionError("no packet from the device")


def guest_send(dev, drivers, mem, op, src_port, dst_port, payload=b""):
    tx = drivers[1]
    hdr = virtio_vsock_hdr(
        src_cid=CID, dst_cid=2, src_port=src_port, dst_port=dst_port, len=len(payload),
        type=1, op=OP[op], buf_alloc=1 << 18,
    )  # fmt: skip
    mem.write(0x200000, bytes(hdr) + payload)
    tx.make_available(tx.chain([(0x200000, HDR_SIZE + len(payload), False)]))
    w(dev, spec.QUEUE_NOTIFY, 1)


def test_a_host_connection_through_the_device_thread(device):
    dev, mem, path, errors = device
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(path)
    client.sendall(b"CONNECT 52\n")
    time.sleep(0.2)
    assert not dev.transport.model.conns  # the driver is not ready: it waits in the backlog
    drivers = set_up(dev, mem)
    hdr, _ = wait_rx(drivers, mem)
    assert NAME[hdr.op] == "REQUEST" and hdr.dst_port == 52
    guest_send(dev, drivers, mem, "RESPONSE", 52, FIRST_HOST_PORT)
    assert client.recv(64) == f"OK {FIRST_HOST_PORT}\n".encode()
    client.sendall(b"to the guest")
    hdr, payload = wait_rx(drivers, mem)
    assert NAME[hdr.op] == "RW" and payload == b"to the guest"
    guest_send(dev, drivers, mem, "RW", 52, FIRST_HOST_PORT, b"to the host")
    assert client.recv(64) == b"to the host"
    client.close()
    hdr, _ = wait_rx(drivers, mem)
    assert NAME[hdr.op] == "SHUTDOWN"
    assert not errors


def test_a_guest_connection_through_the_device_thread(device):
    dev, mem, path, errors = device
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{path}_7000")
    server.listen(1)
    drivers = set_up(dev, mem)
    guest_send(dev, drivers, mem, "REQUEST", 1234, 7000)
    hdr, _ = wait_rx(drivers, mem)
    assert NAME[hdr.op] == "RESPONSE"
    conn, _ = server.accept()
    conn.settimeout(5)
    guest_send(dev, drivers, mem, "RW", 1234, 7000, b"hello")
    assert conn.recv(64) == b"hello"
    conn.sendall(b"back")
    hdr, payload = wait_rx(drivers, mem)
    assert payload == b"back"
    guest_send(dev, drivers, mem, "REQUEST", 1235, 7001)  # nobody at PATH_7001
    hdr, _ = wait_rx(drivers, mem)
    assert NAME[hdr.op] == "RST" and hdr.dst_port == 1235
    conn.close()
    server.close()
    assert not errors


@pytest.mark.kvm
def test_osvmm_run_removes_its_socket_file(tmp_path):
    """``osvmm run`` ends without tearing the partition down (the kernel reclaims
    it), but the socket file is its to remove."""
    from tests.helpers import run_osvmm

    path = tmp_path / "v.sock"
    r = run_osvmm("run", "guests:hello", "--vsock", f"uds={path}")
    assert b"Hello from osvmm guest" in r.stdout, r.stderr
    assert not path.exists()
