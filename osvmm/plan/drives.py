"""A partition's disks as given: ``--drive FILE[,ro]`` and a plan's ``drives``.

Only the text is checked here; the image itself is opened and checked when
the partition is built, before anything else is (vmm/blockfile.py
``open_drive``).
"""

from __future__ import annotations

from dataclasses import dataclass

from osvmm.arch.x86.irq import VIRTIO_IRQS
from osvmm.errors import ConfigError

# Disks of one partition: one virtio-mmio slot each (arch/x86/layout.py
# virtio_mmio_slot), one per ISA IRQ set aside for them.
MAX_DRIVES = len(VIRTIO_IRQS)


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
