"""The channel window's MMIO device: what answers where no writable channel is mapped.

A partition's channel window (layout.CHANNEL_WINDOW_*) holds the shared-memory
channels it attached, each a memslot. An access that reaches the VMM instead
lands here: a write by a read-only member (its memslot is read-only, so the
write exits as MMIO) or any access where nothing is attached. Writes are
dropped and counted (``on_write``); reads give all ones, as an empty bus does.
No I/O, no threads.
"""

from __future__ import annotations

from collections.abc import Callable


class ChannelWindow:
    def __init__(self, on_write: Callable[[int], None]):
        """``on_write(offset)``: told of each dropped write."""
        self._on_write = on_write

    def mmio_write(self, offset: int, data: bytes) -> None:
        self._on_write(offset)

    def mmio_read(self, offset: int, length: int) -> bytes:
        return b"\xff" * length
