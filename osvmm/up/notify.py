"""Readiness and status for a service manager: the ``sd_notify`` protocol.

Under systemd (``Type=notify``, tools/systemd/osvmm@.service) ``$NOTIFY_SOCKET``
names a datagram socket (a path, or ``@name`` in the abstract namespace);
``notify("READY=1", ...)`` sends one datagram of ``KEY=VALUE`` lines to it. With
no ``$NOTIFY_SOCKET`` it does nothing, and a manager that went away changes
nothing: the VMM never fails for want of one. The protocol is a datagram of
lines on a Unix socket (sd_notify(3)); it needs no library.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``lines`` to the service manager; whether one was told."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), path)
        return True
    except OSError:
        return False
