"""A writer of the cpio "newc" format, the format of a Linux initramfs.

Written from the kernel's Documentation/driver-api/early-userspace/buffer-format.rst.
Each member is a 110-byte ASCII header, the NUL-terminated name, and the data::

    c_magic     6 bytes   "070701"
    c_ino       8 hex     inode number
    c_mode      8 hex     file type and permissions (st_mode)
    c_uid       8 hex
    c_gid       8 hex
    c_nlink     8 hex     number of links
    c_mtime     8 hex     modification time (seconds since the epoch)
    c_filesize  8 hex     size of the data (0 for directories and device nodes)
    c_maj       8 hex     major of the device holding the file
    c_min       8 hex     minor of the device holding the file
    c_rmaj      8 hex     major of a device node
    c_rmin      8 hex     minor of a device node
    c_namesize  8 hex     length of the name including its NUL
    c_chksum    8 hex     0 for "070701"

The name is padded with NULs so that header + name is a multiple of 4 bytes;
the data likewise. A symbolic link's data is its target (without a NUL). The
archive ends with a member named "TRAILER!!!".

Output is reproducible: uid and gid are 0, every mtime is one fixed value, the
device of the holding filesystem is 0, and inode numbers are the members'
positions counted from 0 (as GNU cpio's ``--reproducible`` numbers them). A
directory's link count is 2 plus its subdirectories in the archive, a
regular file's 1, so the kernel's hard-link detection (nlink >= 2 on a regular
file) never fires. Members are written in the order given; a directory must
come before what it holds, because the kernel's unpacker creates no parents.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
NEWC_HEADER_SIZE = 110
TRAILER_NAME = "TRAILER!!!"
_FIELD_MAX = 0xFFFF_FFFF


@dataclass(frozen=True)
class Entry:
    """One archive member: ``name`` relative, without a leading "/" ("bin/sh")."""

    name: str
    mode: int  # st_mode: file type bits and permissions
    data: bytes = b""
    rdevmajor: int = 0
    rdevminor: int = 0

    def __post_init__(self) -> None:
        check_name(self.name)
        kind = stat.S_IFMT(self.mode)
        if kind not in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK):
            raise ValueError(f"cpio: {self.name}: unsupported file type {self.mode:#o}")
        if self.data and kind not in (stat.S_IFREG, stat.S_IFLNK):
            raise ValueError(f"cpio: {self.name}: only files and symlinks carry data")
        if kind == stat.S_IFLNK and not self.data:
            raise ValueError(f"cpio: {self.name}: a symlink needs a target")
        if len(self.data) > _FIELD_MAX:
            raise ValueError(f"cpio: {self.name}: larger than 4 GiB")

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def check_name(name: str) -> None:
    """Reject names the kernel's unpacker or an extractor would misplace."""
    if not name or name.startswith("/") or name.endswith("/"):
        raise ValueError(f"cpio: bad member name {name!r}: must be relative, without a final /")
    if "\0" in name:
        raise ValueError(f"cpio: bad member name {name!r}: contains NUL")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"cpio: bad member name {name!r}: empty, . or .. component")
    if name == TRAILER_NAME:
        raise ValueError(f"cpio: {TRAILER_NAME} is reserved for the trailer")


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | (perm & 0o7777))


def regular_file(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | (perm & 0o7777), bytes(data))


def symlink(name: str, target: str) -> Entry:
    """A symbolic link; its permissions are 0777 as Linux shows them."""
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | (perm & 0o7777), b"", major, minor)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc_header(
    *,
    ino: int,
    mode: int,
    nlink: int,
    mtime: int,
    filesize: int,
    rdevmajor: int,
    rdevminor: int,
    namesize: int,
    uid: int = 0,
    gid: int = 0,
    devmajor: int = 0,
    devminor: int = 0,
) -> bytes:
    """The 110-byte header; the fields in the order of buffer-format.rst."""
    fields = (
        ino,
        mode,
        uid,
        gid,
        nlink,
        mtime,
        filesize,
        devmajor,
        devminor,
        rdevmajor,
        rdevminor,
        namesize,
        0,  # c_chksum: always 0 in "070701" archives
    )
    for value in fields:
        if not 0 <= value <= _FIELD_MAX:
            raise ValueError(f"cpio: header field {value} does not fit in 8 hex digits")
    header = NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)
    assert len(header) == NEWC_HEADER_SIZE
    return header


def _member(header: bytes, name: bytes, data: bytes) -> bytes:
    head = header + name + b"\0"
    return head + _pad4(len(head)) + data + _pad4(len(data))


def write_newc(entries: Iterable[Entry], mtime: int = 0) -> bytes:
    """The archive of ``entries`` in the given order, ending with the trailer."""
    members = list(entries)
    seen: set[str] = set()
    subdirs: dict[str, int] = {}
    for e in members:
        if e.name in seen:
            raise ValueError(f"cpio: duplicate member {e.name!r}")
        seen.add(e.name)
        if e.is_dir:
            parent = e.name.rpartition("/")[0]
            subdirs[parent] = subdirs.get(parent, 0) + 1
    out = bytearray()
    for ino, e in enumerate(members):
        name = e.name.encode()
        nlink = 2 + subdirs.get(e.name, 0) if e.is_dir else 1
        header = newc_header(
            ino=ino,
            mode=e.mode,
            nlink=nlink,
            mtime=mtime,
            filesize=len(e.data),
            rdevmajor=e.rdevmajor,
            rdevminor=e.rdevminor,
            namesize=len(name) + 1,
        )
        out += _member(header, name, e.data)
    trailer = TRAILER_NAME.encode()
    out += _member(
        newc_header(
            ino=0,
            mode=0,
            nlink=1,
            mtime=0,
            filesize=0,
            rdevmajor=0,
            rdevminor=0,
            namesize=len(trailer) + 1,
        ),
        trailer,
        b"",
    )
    return bytes(out)
