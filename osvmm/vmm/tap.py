"""A host tap device: the backend of one virtio-net device (devices/virtio/net.py).

``open_tap`` is step 1 of a build (inputs), before /dev/kvm is opened: a tap
that cannot be created or attached (no /dev/net/tun, no CAP_NET_ADMIN, a name
too long, a tap another process holds) is a ConfigError, one line, exit 2.
The tap is opened without packet information (IFF_NO_PI) and without the vnet
header (no offloads are offered to the guest), non-blocking. A tap that
existed before (``ip tuntap add NAME mode tap``, persistent) is attached and
left as it was; one osvmm created goes away when the VMM closes it. Bringing
it up and addressing it is the host's business (``ip link set NAME up``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import zlib

from osvmm.errors import ConfigError
from osvmm.plan.drives import check_tap_name

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65535 + 14
FLUSH_MAX = 4096  # frames a flush drops at most (a tap's queue holds txqueuelen, 1000 by default)


class Tap:
    """An open tap: frames in and out, non-blocking."""

    def __init__(self, fd: int, name: str):
        self.fd = fd
        self.name = name
        self.path = f"tap {name}"

    def recv(self) -> bytes | None:
        try:
            return os.read(self.fd, MAX_FRAME)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno == errno.EIO:  # the interface is down: nothing to receive
                return None
            raise

    def send(self, frame: bytes) -> bool:
        """Whether the frame went out (a full queue or a down interface drops it)."""
        try:
            os.write(self.fd, frame)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if e.errno in (errno.EIO, errno.EINVAL, errno.ENOBUFS):
                return False
            raise
        return True

    def flush(self) -> None:
        """Drop what the host queued on the tap (the device reset: by its driver, or
        for the next boot of a partition kept built), so that a boot starts from
        an empty queue as one built anew does (attaching a tap finds its queue
        purged). At most FLUSH_MAX frames: a host that keeps sending is not waited out."""
        for _ in range(FLUSH_MAX):
            if self.recv() is None:
                return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def default_mac(name: str, salt: str = "") -> bytes:
    """A locally administered unicast MAC derived from the tap's name: stable from
    one run to the next, 02:6f:73 ("os") then three bytes of a CRC."""
    crc = zlib.crc32(f"{salt}/{name}".encode())
    return bytes([0x02, 0x6F, 0x73]) + crc.to_bytes(4, "little")[:3]


def open_tap(name: str, what: str = "--net") -> Tap:
    check_tap_name(name, what)
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(
            f"{what} tap={name}: cannot open {TUN_PATH}: {e.strerror} (the tun module?)"
        ) from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            why = {
                errno.EPERM: "not permitted (creating a tap needs CAP_NET_ADMIN; "
                "or create it first: ip tuntap add NAME mode tap user USER)",
                errno.EBUSY: "in use by another process",
                errno.EINVAL: "not a tap (a tun, or another kind of interface of that name?)",
            }.get(e.errno, e.strerror)
            raise ConfigError(f"{what} tap={name}: cannot attach: {why}") from None
        return Tap(fd, name)
    except BaseException:
        os.close(fd)
        raise
