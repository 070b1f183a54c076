"""A partition's disks, NICs and vsock as given: ``--drive FILE[,ro]`` and a
plan's ``drives``; ``--net tap=NAME[,mac=XX:XX:XX:XX:XX:XX]``; ``--vsock
uds=PATH[,cid=N]`` and a plan's ``vsock``.

Only the text is checked here; the image itself is opened and checked when
the partition is built, before anything else is (vmm/blockfile.py
``open_drive``).
"""

from __future__ import annotations

from dataclasses import dataclass

from osvmm.arch.x86.irq import VIRTIO_IRQS
from osvmm.errors import ConfigError

# Disks and NICs of one partition: one virtio-mmio slot each (arch/x86/layout.py
# virtio_mmio_slot), one per ISA IRQ set aside for them.
MAX_DRIVES = len(VIRTIO_IRQS)
MAX_DEVICES = MAX_DRIVES
# vsock (virtio 1.2 5.10.4): a guest's CID; 0-2 are reserved (2 is the host) and
# U32_MAX is VMADDR_CID_ANY. The Unix socket's path leaves room in sun_path
# (108 bytes with its NUL) for the "_PORT" of a guest's connects.
DEFAULT_CID = 3
MIN_CID = 3
MAX_CID = 0xFFFFFFFF - 1
MAX_UDS_PATH = 107 - len("_4294967295")


@dataclass(frozen=True)
class Drive:
    """One disk of a partition: a raw image, read-only or not."""

    path: str
    readonly: bool = False


def parse_drive(text: str, what: str = "--drive") -> Drive:
    """``FILE[,ro]`` (``,rw``, the default, may be said) into a Drive. A file
    name holding a comma cannot be given (as QEMU without its ``,,`` escape)."""
    path, *opts = text.split(",")
    if not path:
        raise ConfigError(f"{what} {text!r}: no image file named (FILE[,ro])")
    readonly = False
    for opt in opts:
        if opt == "ro":
            readonly = True
        elif opt == "rw":
            readonly = False
        else:
            raise ConfigError(f"{what} {text}: unknown option {opt!r} (FILE[,ro])")
    return Drive(path, readonly)


@dataclass(frozen=True)
class Net:
    """One NIC of a partition: a host tap device, and the MAC the guest sees (None:
    derived from the tap's name, vmm/tap.py default_mac)."""

    tap: str
    mac: bytes | None = None


def parse_mac(text: str, what: str) -> bytes:
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(
            f"{what}: mac {text!r} is not six hex bytes (XX:XX:XX:XX:XX:XX)"
        ) from None
    if mac[0] & 1:
        raise ConfigError(f"{what}: mac {text} is a multicast address (odd first byte)")
    return mac


IFNAMSIZ = 16  # linux/if.h: an interface's name and its NUL


def check_tap_name(name: str, what: str) -> None:
    """ConfigError unless ``name`` can name a host interface (checked before a tap is
    attached: vmm/tap.py ``open_tap``, and a plan's ``nets`` when it is read)."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name.strip() != name:
        raise ConfigError(f"{what} tap={name}: not an interface name (1-15 bytes, no '/')")


def parse_net(text: str, what: str = "--net") -> Net:
    """``tap=NAME[,mac=XX:XX:XX:XX:XX:XX]`` into a Net, its tap's name checked."""
    tap = None
    mac = None
    for opt in text.split(","):
        key, sep, value = opt.partition("=")
        if key == "tap" and sep:
            tap = value
        elif key == "mac" and sep:
            mac = parse_mac(value, f"{what} {text}")
        else:
            raise ConfigError(
                f"{what} {text}: unknown option {opt!r} (tap=NAME[,mac=XX:XX:XX:XX:XX:XX])"
                if tap is not None or key in ("mac",) or sep
                else f"{what} {text}: give tap=NAME (tap=NAME[,mac=XX:XX:XX:XX:XX:XX])"
            )
    if tap is None:
        raise ConfigError(f"{what} {text}: give tap=NAME (tap=NAME[,mac=XX:XX:XX:XX:XX:XX])")
    check_tap_name(tap, what)
    return Net(tap, mac)


@dataclass(frozen=True)
class Vsock:
    """A partition's virtio-vsock device: the Unix socket its host side listens
    on (vmm/vsock_uds.py) and the guest's CID."""

    uds: str
    cid: int = DEFAULT_CID


VSOCK_SYNTAX = "uds=PATH[,cid=N]"


def check_vsock(uds: str, cid: object, what: str) -> Vsock:
    """A Vsock from its two values, checked: a path that fits a Unix socket address
    with a ``_PORT`` suffix, a CID a guest may have."""
    if not uds:
        raise ConfigError(f"{what}: uds: an empty path ({VSOCK_SYNTAX})")
    if "\0" in uds:
        raise ConfigError(f"{what}: uds: a path with a NUL byte")
    if len(uds.encode(errors="surrogateescape")) > MAX_UDS_PATH:
        raise ConfigError(
            f"{what}: uds: the path is longer than {MAX_UDS_PATH} bytes (a Unix socket "
            "address, with room for the _PORT of a guest's connects)"
        )
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise ConfigError(f"{what}: cid {cid!r} is not a whole number")
    if not MIN_CID <= cid <= MAX_CID:
        raise ConfigError(
            f"{what}: cid {cid} is not {MIN_CID} to {MAX_CID} (0-2 are reserved, "
            f"{MAX_CID + 1} is VMADDR_CID_ANY)"
        )
    return Vsock(uds, cid)


def parse_vsock(text: str, what: str = "--vsock") -> Vsock:
    """``uds=PATH[,cid=N]`` into a Vsock (a path holding a comma cannot be given)."""
    uds = None
    cid: object = DEFAULT_CID
    where = f"{what} {text}"
    for opt in text.split(","):
        key, sep, value = opt.partition("=")
        if key == "uds" and sep:
            uds = value
        elif key == "cid" and sep:
            try:
                cid = int(value, 10)
            except ValueError:
                cid = value
        else:
            raise ConfigError(f"{where}: unknown option {opt!r} ({VSOCK_SYNTAX})")
    if uds is None:
        raise ConfigError(f"{where}: give uds=PATH ({VSOCK_SYNTAX})")
    return check_vsock(uds, cid, where)
