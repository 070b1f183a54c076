"""The partition console on the host side: guest output to a sink, input from stdin.

Output goes straight to a file descriptor (one write per guest byte: the
guest's byte already cost an exit). Input, when interactive, is read from
stdin in raw mode by a thread and offered to the UART's bounded FIFO; what
does not fit waits and is offered again. Ctrl-A then x quits, as in QEMU.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import time
import tty

ESCAPE = b"\x01"  # Ctrl-A


def fd_writer(fd: int, also=None):
    """A sink writing guest output to ``fd`` (and to ``also``, e.g. a log file, if given)."""

    def write(data: bytes) -> None:
        try:
            os.write(fd, data)
        except OSError:
            pass
        if also is not None:
            also.write(data)
            also.flush()

    return write


class StdinForwarder:
    """Reads stdin (raw mode when it is a terminal) into a Serial's input FIFO."""

    def __init__(self, serial, on_quit, fd: int | None = None):
        self.serial = serial
        self.on_quit = on_quit
        self.fd = sys.stdin.fileno() if fd is None else fd
        self._saved = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-in", daemon=True)

    def start(self) -> None:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(1.0)  # select() wakes within 0.2 s
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def _run(self) -> None:
        escape = False
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(self.fd, 64)
            except OSError:  # stdin closed under us: no more input
                return
            if not data:
                return
            if escape or ESCAPE in data:
                if escape and data[:1] == b"x" or data.endswith(ESCAPE + b"x"):
                    self.on_quit()
                    return
                escape = data.endswith(ESCAPE)
                if escape:
                    data = data[:-1]
            while data and not self._stop.is_set():
                taken = self.serial.enqueue(data)
                data = data[taken:]
                if data:
                    time.sleep(0.005)
