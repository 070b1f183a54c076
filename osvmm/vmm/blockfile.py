"""Raw disk images: a drive's file, checked and opened before anything is built,
and the I/O virtio-blk's model asks of it (devices/virtio/blk.py).

``open_drive`` is step 1 of a build (inputs): a missing, unreadable or
unwritable file, a directory or device, an empty image, one whose size is not
a whole number of 512-byte sectors, or one another VMM has open for writing
is a ConfigError (exit 2) before /dev/kvm is opened. A writable drive is
locked (flock, exclusive) and a read-only one shared-locked, so two VMMs never
write one image, nor one writes what another reads.

Discard punches a hole (fallocate PUNCH_HOLE | KEEP_SIZE): the file keeps its
size and the range reads as zeros. Whether the host file system allows it is
probed at open (a hole punched past the end changes nothing); where it does
not, the device does not offer discard.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat

from osvmm.devices.virtio.spec import SECTOR_SIZE
from osvmm.errors import ConfigError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class RawImage:
    """An open raw image: the backend of one virtio-blk device."""

    def __init__(self, fd: int, size: int, readonly: bool, path: str):
        self.fd = fd
        self.size = size
        self.readonly = readonly
        self.path = path
        self.can_discard = not readonly and _probe_discard(fd, size)

    def read_into(self, offset: int, views) -> None:
        views = list(views)
        while views:
            n = os.preadv(self.fd, views, offset)
            if n == 0:  # the file shrank under us: what is gone reads as zeros
                for v in views:
                    v[:] = bytes(len(v))
                return
            offset += n
            views = _advance(views, n)

    def write_from(self, offset: int, views) -> None:
        views = list(views)
        while views:
            n = os.pwritev(self.fd, views, offset)
            offset += n
            views = _advance(views, n)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        _punch_hole(self.fd, offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the flock goes with it
            self.fd = -1


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` after ``n`` bytes."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views = views[1:]
    if views and n:
        views = [views[0][n:], *views[1:]]
    return views


def _probe_discard(fd: int, size: int) -> bool:
    try:
        _punch_hole(fd, size, SECTOR_SIZE)
    except OSError:
        return False
    return True


def lock_image(fd: int, readonly: bool) -> None:
    """The image's lock: shared for a read-only disk, exclusive for a writable one;
    BlockingIOError when another open file holds one that conflicts. It belongs to
    the open file, so a descriptor passed to another process (a takeover) carries it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise BlockingIOError(e.errno, e.strerror) from None
        raise


def open_drive(path: str, readonly: bool, what: str = "--drive", lock: bool = True) -> RawImage:
    """Open and check the raw image at ``path``; ConfigError (one line) when it
    cannot be a drive. ``what`` names the option or plan field in the message.
    ``lock=False``: checked only, not locked (a plan checked while the VMM its
    partition comes from holds the image: ``osvmm up --incoming``, ``--takeover``)."""
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory, not a disk image") from None
    except PermissionError:
        mode = "reading" if readonly else "reading and writing (add ,ro for a read-only disk)"
        raise ConfigError(f"{what} {path}: permission denied for {mode}") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path}: not a regular file (a raw disk image)")
        if st.st_size == 0:
            raise ConfigError(f"{what} {path}: the image is empty")
        if st.st_size % SECTOR_SIZE:
            raise ConfigError(
                f"{what} {path}: {st.st_size} bytes is not a whole number of "
                f"{SECTOR_SIZE}-byte sectors"
            )
        if lock:
            try:
                lock_image(fd, readonly)
            except BlockingIOError:
                raise ConfigError(
                    f"{what} {path}: in use by another VM (locked); "
                    "give it to one at a time, or ,ro to all"
                ) from None
            except OSError as e:
                raise ConfigError(f"{what} {path}: cannot be locked: {e.strerror}") from None
        return RawImage(fd, st.st_size, readonly, path)
    except BaseException:
        os.close(fd)
        raise
