"""Directories and files the VMM creates on the host, safe from other users.

The VMM often runs as root and writes where a plan says (logs, the control
socket, its lock files). Another user must not be able to point those writes
elsewhere (a symbolic link planted where a log will be created) or replace
what the VMM reads back, so (docs/security.md):

- ``private_dir(path, what)`` creates ``path`` (mode 0700) where missing and
  returns a descriptor of it once checked: a directory owned by this user or
  root and writable by nobody else, reached through no symbolic link another
  user owns. Files are then opened relative to that descriptor, so the
  directory checked is the directory used.
- ``open_private(dir_fd, name, what)`` opens or creates a file there for
  appending, never through a symbolic link (``O_NOFOLLOW``), created 0600; an
  existing file must be a regular file of this user's with one link, and
  one more open than 0640 is narrowed to 0600.

Failures are ConfigError (status 2), one line naming ``what`` and the path.
"""

from __future__ import annotations

import os
import stat

from osvmm.errors import ConfigError

DIR_MODE = 0o700
FILE_MODE = 0o600
MOST_OPEN_FILE_MODE = 0o640  # a file more open than this is narrowed to FILE_MODE


def _owners() -> tuple[int, ...]:
    return (os.geteuid(), 0)


def _check_links(path: str, what: str) -> None:
    """No component of ``path`` is a symbolic link another user owns."""
    cur = os.sep if os.path.isabs(path) else ""
    for part in [p for p in path.split(os.sep) if p]:
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ConfigError(f"{what}: cannot use {cur}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in _owners():
            raise ConfigError(f"{what}: {cur} is a symbolic link of uid {st.st_uid}: not followed")


def check_dir_stat(st: os.stat_result, path: str, what: str) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what}: {path} is not a directory")
    if st.st_uid not in _owners():
        raise ConfigError(
            f"{what}: {path} belongs to uid {st.st_uid}, not to you or root: not used"
        )
    if st.st_mode & 0o022:
        raise ConfigError(
            f"{what}: {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
            "use a directory only you can write"
        )


def private_dir(path: str, what: str) -> int:
    """``path`` created (0700) where missing, checked, and opened: its descriptor."""
    path = os.path.abspath(path)
    _check_links(path, what)
    try:
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{what}: cannot create {path}: {e.strerror}") from None
    try:
        check_dir_stat(os.fstat(fd), path, what)
    except ConfigError:
        os.close(fd)
        raise
    return fd


def open_private(dir_fd: int, name: str, what: str, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """``name`` in the directory ``dir_fd``, opened (created 0600) without following
    a symbolic link; a file that is not a plain file of this user's is refused."""
    flags |= os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, FILE_MODE, dir_fd=dir_fd)
    except OSError as e:
        why = "a symbolic link: not followed" if e.errno == 40 else e.strerror  # ELOOP
        raise ConfigError(f"{what}: cannot open {name}: {why}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what}: {name} is not a plain file")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"{what}: {name} belongs to uid {st.st_uid}: not written")
        if st.st_nlink != 1:
            raise ConfigError(f"{what}: {name} has {st.st_nlink} hard links: not written")
        if stat.S_IMODE(st.st_mode) & ~MOST_OPEN_FILE_MODE:
            os.fchmod(fd, FILE_MODE)
        os.set_blocking(fd, True)  # O_NONBLOCK was only for a FIFO planted by the name
    except ConfigError:
        os.close(fd)
        raise
    return fd
