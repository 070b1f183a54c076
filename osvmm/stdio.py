"""The process's standard streams, safe in whatever state the caller left them.

An exit status must not depend on whether a message could be written, and a
closed stream must not become some other file:

- ``ensure_std_fds()``: file descriptors 0, 1 and 2 that the caller closed
  (``<&-``, ``>&-``) are opened on /dev/null, first thing, so no file, pipe or
  socket the VMM opens later lands on them (a log written to "stdout", a pipe
  end closed by a ``dup2``), and ``sys.stdin``/``stdout``/``stderr`` exist.
- ``say(line)``: one line to stderr; a stderr that is closed, full or a broken
  pipe loses the line and nothing else.
- ``settle()``: flush stdout and stderr before the process exits; what cannot
  be written is dropped, so the interpreter's own final flush cannot turn the
  status into 120 or print a traceback.
"""

from __future__ import annotations

import os
import sys

_STREAMS = (("stdin", os.O_RDONLY, "r"), ("stdout", os.O_WRONLY, "w"), ("stderr", os.O_WRONLY, "w"))


def ensure_std_fds() -> None:
    for fd, (attr, flags, mode) in enumerate(_STREAMS):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, flags)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        setattr(sys, attr, open(fd, mode, closefd=False, buffering=1 if fd == 2 else -1))  # noqa: SIM115


def say(line: str) -> None:
    """``line`` and a newline to stderr, unbuffered; errors are ignored."""
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):
        pass
    data = (line + "\n").encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(2, data) :]
    except OSError:
        pass


def settle() -> None:
    """Flush stdout and stderr; a stream that cannot take its bytes is pointed at
    /dev/null (its bytes are lost) so that no later flush fails."""
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
                stream.flush()
            except (OSError, ValueError):
                pass
