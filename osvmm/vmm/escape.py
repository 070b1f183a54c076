"""The console escape: Ctrl-A then x quits (``osvmm run``) or detaches (``osvmm console``).

Input arrives in chunks of whatever size a read returns, so the two bytes may
come in two reads. ``ConsoleEscape.feed(chunk)`` returns what to forward and
whether the escape was seen: a Ctrl-A at the end of a chunk is held until the
next one shows whether an x follows; a Ctrl-A followed by anything else is
forwarded as it came. Bytes before the escape are forwarded, bytes after it
are not.
"""

from __future__ import annotations

ESCAPE = b"\x01x"  # Ctrl-A x, as in QEMU


class ConsoleEscape:
    """Finds Ctrl-A x in a stream of byte chunks."""

    def __init__(self):
        self._held = b""  # a trailing Ctrl-A whose next byte has not arrived

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        """(the bytes to forward, whether the escape ended the stream)."""
        data = self._held + chunk
        self._held = b""
        cut = data.find(ESCAPE)
        if cut >= 0:
            return data[:cut], True
        if data.endswith(ESCAPE[:1]):
            self._held = ESCAPE[:1]
            data = data[:-1]
        return data, False
