"""``osvmm console NAME``: a partition's serial console on this terminal.

The control connection is upgraded to a raw stream (``101 Switching
Protocols``, docs/api.md). The terminal goes raw; one thread copies the console's
bytes from the control socket to stdout, the caller's thread copies stdin to the socket until
Ctrl-A x (osvmm/vmm/escape.py) detaches or the VMM closes the console. At
stdin's end of file the output keeps flowing until the VMM closes it (or
Ctrl-C). The terminal's settings are restored however it ends.
"""

from __future__ import annotations

import os
import select
import sys
import threading

from osvmm.errors import EXIT_INTERRUPTED
from osvmm.stdio import say
from osvmm.up.protocol import attach as open_console
from osvmm.vmm.escape import ConsoleEscape


def attach(path, name: str) -> int:
    import termios
    import tty

    sock, first = open_console(path, name)
    sock.settimeout(None)
    if first:
        sys.stdout.buffer.write(first)
        sys.stdout.buffer.flush()
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    say(f"osvmm: console of {name} (Ctrl-A x detaches)")
    out = threading.Thread(target=_copy_out, args=(sock,), daemon=True)
    out.start()
    status = 0  # detached (Ctrl-A x), or the VMM closed the console
    try:
        if saved is not None:
            tty.setraw(stdin)
        _copy_in(sock, stdin, out)
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        sock.close()
    say("\r\nosvmm: detached")
    return status


def _copy_out(sock) -> None:
    out = sys.stdout.buffer
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return
            out.write(data)
            out.flush()
    except OSError:
        return


def _copy_in(sock, stdin: int, out: threading.Thread) -> None:
    """Stdin to the console until Ctrl-A x, or the VMM closes; at stdin's EOF keep
    showing the output until the VMM closes the console (or Ctrl-C)."""
    escape = ConsoleEscape()
    stdin_open = True
    while out.is_alive():
        if not stdin_open:
            out.join(0.5)
            continue
        ready, _, _ = select.select([stdin], [], [], 0.5)
        if not ready:
            continue
        data = os.read(stdin, 1024)
        if not data:
            stdin_open = False
            continue
        data, detach = escape.feed(data)
        if data:
            sock.sendall(data)
        if detach:
            return
