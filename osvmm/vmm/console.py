"""The partition console on the host side: guest output to a sink, input from stdin.

Output goes straight to a file descriptor (one write per guest byte: the
guest's byte already cost an exit). Input, when interactive, is read from
stdin in raw mode by a thread and offered to the UART's bounded FIFO
(``feed_uart``, which the control socket's console uses too); what does not
fit waits and is offered again. Ctrl-A then x quits, as in QEMU
(osvmm/vmm/escape.py).
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable

from osvmm.vmm.escape import ConsoleEscape

RETRY_S = 0.005  # how soon input that did not fit is offered to the FIFO again


def fd_writer(fd: int, on_closed: Callable[[], None] | None = None):
    """A sink writing guest output to ``fd``, all of it: a short write is continued,
    and a non-blocking ``fd`` that is full is waited on (the guest waits for a slow
    reader, as on QEMU's stdio; nothing is lost). When the reader has gone (EPIPE)
    ``on_closed`` is called once and output is dropped from then on; other errors
    (a full disk) lose the bytes of that write."""
    closed = False

    def write(data: bytes) -> None:
        nonlocal closed
        view = memoryview(data)
        while view and not closed:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                select.select([], [fd], [], 1.0)
            except BrokenPipeError:
                closed = True
                if on_closed is not None:
                    on_closed()
            except OSError:
                return

    return write


def feed_uart(serial_of: Callable[[], object | None], data: bytes) -> bool:
    """Offer ``data`` to a UART's bounded input FIFO until all of it is taken; what
    does not fit waits ``RETRY_S`` and is offered again. ``serial_of()`` is asked
    before each offer: None (the partition stopped, the reader is stopping) drops
    the rest. True when everything was delivered."""
    while data:
        serial = serial_of()
        if serial is None:
            return False
        data = data[serial.enqueue(data) :]
        if data:
            time.sleep(RETRY_S)
    return True


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
        if os.isatty(self.fd):  # the terminal modules only for a terminal (start-up time)
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(1.0)  # select() wakes within 0.2 s
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def _serial_unless_stopped(self):
        return None if self._stop.is_set() else self.serial

    def _run(self) -> None:
        escape = ConsoleEscape()
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
            data, quit_ = escape.feed(data)
            feed_uart(self._serial_unless_stopped, data)
            if quit_:
                self.on_quit()
                return
