"""QEMU's isa-debug-exit device: a write of V to its port ends the run.

The VMM's exit status is then (V << 1) | 1, as under QEMU, so a guest tested
under ``qemu-system-x86_64 -device isa-debug-exit,iobase=0xf4`` runs
unchanged. Reads return 0xff (QEMU's device has no readable register).
"""

from __future__ import annotations

from collections.abc import Callable

DEBUG_EXIT_PORT = 0xF4


def exit_status(value: int) -> int:
    """The process exit status QEMU reports for a write of ``value`` (8 bits)."""
    return ((value << 1) | 1) & 0xFF


class DebugExit:
    def __init__(self, on_exit: Callable[[int], None]):
        self._on_exit = on_exit

    def write(self, offset: int, value: int) -> None:
        self._on_exit(value & 0xFF)

    def read(self, offset: int) -> int:
        return 0xFF
