"""Reading a file a user named: its kind and size are checked before a byte is read.

Every input file (an image, a kernel, an initrd, a plan, a busybox, a host
topology file) is read through ``read_input``: the path is stat'ed first and
must be a regular file (a directory, a FIFO or a device is refused by name,
so ``/dev/zero`` or a named pipe cannot make the VMM read forever or hang),
no larger than the caller's cap (a 3 GB initrd is refused from its size, not
after reading 1 GiB of it); it is then opened without blocking, checked again
on the open descriptor, and read for exactly its size. Files whose size the
kernel does not report (procfs, st_size 0) are read up to the cap plus one
byte, so they are bounded too.

``input_problem`` gives the same diagnosis without reading (``osvmm plan``
warns with it).
"""

from __future__ import annotations

import os
import stat

from osvmm.errors import OsvmmError

_KINDS = (
    (stat.S_ISDIR, "is a directory, not a file"),
    (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
    (stat.S_ISCHR, "is a character device, not a regular file"),
    (stat.S_ISBLK, "is a block device, not a regular file"),
    (stat.S_ISSOCK, "is a socket, not a regular file"),
)


_UNSIZED_READ = 1 << 16  # bytes per read of a file whose size is not known


def format_bytes(n: int) -> str:
    """A size for a message: 1 GiB, 3.0 GiB, 512 KiB, 100 bytes."""
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            return f"{n // unit} {name}" if n % unit == 0 else f"{n / unit:.1f} {name}"
    return f"{n} bytes"


def _kind_problem(mode: int) -> str | None:
    for test, problem in _KINDS:
        if test(mode):
            return problem
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    return None


def _os_problem(err: OSError) -> str:
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, NotADirectoryError):
        return "no such file (a directory in the path is a file)"
    return f"cannot read: {err.strerror or err}"


def input_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as an input file, or None when it can be."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        return _os_problem(e) if isinstance(e, OSError) else "not a valid path"
    problem = _kind_problem(st.st_mode)
    if problem is None and not os.access(path, os.R_OK):
        problem = "permission denied"
    return problem


def read_input(
    path: str | os.PathLike[str],
    label: str,
    limit: int,
    error: type[OsvmmError],
) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Every problem is ``error`` with a one-line message starting with ``label``
    ("image /x.elf: is a FIFO (named pipe), not a regular file").
    """
    try:
        problem = _kind_problem(os.stat(path).st_mode)
        if problem is not None:
            raise error(f"{label}: {problem}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise error(f"{label}: {_os_problem(e)}") from None
    except ValueError:  # a NUL in the path
        raise error(f"{label}: not a valid path") from None
    try:
        st = os.fstat(fd)  # the file opened, which a rename may have changed
        problem = _kind_problem(st.st_mode)
        if problem is not None:
            raise error(f"{label}: {problem}")
        if st.st_size > limit:
            raise error(
                f"{label}: {format_bytes(st.st_size)} is larger than the "
                f"{format_bytes(limit)} an input file may have"
            )
        # A regular file: one read into one buffer of its size. A file that reports no
        # size (procfs, or an empty file): small reads, up to the cap and one byte more.
        want, step = (st.st_size, st.st_size) if st.st_size else (limit + 1, _UNSIZED_READ)
        chunks: list[bytes] = []
        got = 0
        while got < want:
            chunk = os.read(fd, min(want - got, step))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise error(f"{label}: {_os_problem(e)}") from None
    finally:
        os.close(fd)
    if got > limit:
        raise error(f"{label}: larger than the {format_bytes(limit)} an input file may have")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
