"""A partition's disks and NICs as given: ``--drive FILE[,ro]`` and a plan's
``drives``; ``--net tap=NAME[,mac=XX:XX:XX:XX:XX:XX]``.

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


def parse_net(text: str, what: str = "--net") -> Net:
    """``tap=NAME[,mac=XX:XX:XX:XX:XX:XX]`` into a Net."""
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
    return Net(tap, mac)
