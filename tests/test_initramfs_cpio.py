"""The cpio newc writer: hand-computed bytes, GNU cpio's output, bsdtar's reading."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from osvmm.boot import cpio


def _hdr(ino, mode, nlink, size, rmaj, rmin, namesize, mtime=0):
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rmaj, rmin, namesize, 0)
    return b"070701" + b"".join(f"{v:08X}".encode() for v in fields)


def test_single_file_archive_hand_computed():
    got = cpio.write_newc([cpio.regular_file("a", b"xyz", 0o644)], mtime=0x1234)
    expected = (
        # 110 + "a\0" = 112: aligned, no name padding; data 3 bytes + 1 pad
        _hdr(0, 0o100644, 1, 3, 0, 0, 2, mtime=0x1234)
        + b"a\0"
        + b"xyz\0"
        # trailer: 110 + 11 = 121 -> 3 bytes of padding
        + _hdr(0, 0, 1, 0, 0, 0, 11)
        + b"TRAILER!!!\0"
        + b"\0\0\0"
    )
    assert got == expected
    assert len(got) % 4 == 0


def test_header_layout_and_padding_of_each_kind():
    entries = [
        cpio.directory("dev", 0o755),
        cpio.char_device("dev/console", 5, 1, 0o600),
        cpio.symlink("sh", "busybox"),
        cpio.regular_file("hello.txt", b"hello\n", 0o600),
    ]
    data = cpio.write_newc(entries)
    off = 0
    seen = []
    while True:
        assert off % 4 == 0
        h = data[off : off + 110]
        assert h[:6] == b"070701"
        f = [int(h[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        namesize, size = f[11], f[6]
        name = data[off + 110 : off + 110 + namesize]
        assert name.endswith(b"\0")
        name = name[:-1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off : off + size]
        off += size + (-size % 4)
        seen.append((name, f, body))
        if name == "TRAILER!!!":
            break
    assert off == len(data)
    by = {n: (f, body) for n, f, body in seen}
    f, _ = by["dev"]
    assert (f[1], f[4]) == (0o040755, 2)
    f, body = by["dev/console"]
    assert (f[1], f[6], f[9], f[10], body) == (0o020600, 0, 5, 1, b"")
    f, body = by["sh"]
    assert (f[1], f[6], body) == (0o120777, 7, b"busybox")
    f, body = by["hello.txt"]
    assert (f[1], f[4], body) == (0o100600, 1, b"hello\n")
    assert [f[0] for _, f, _ in seen[:-1]] == [0, 1, 2, 3]
    assert all(f[2] == f[3] == f[12] == 0 for _, f, _ in seen)


def test_directory_nlink_counts_subdirectories():
    data = cpio.write_newc(
        [cpio.directory("a"), cpio.directory("a/b"), cpio.directory("a/c"), cpio.directory("d")]
    )
    # c_nlink of "a" is the 5th field of the first header
    assert int(data[6 + 8 * 4 : 6 + 8 * 5], 16) == 4


@pytest.mark.parametrize("name", ["", "/abs", "a/", "a//b", "./a", "a/../b", "..", "TRAILER!!!"])
def test_bad_names_are_rejected(name):
    with pytest.raises(ValueError):
        cpio.regular_file(name, b"")


def test_duplicates_and_bad_entries_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        cpio.write_newc([cpio.directory("a"), cpio.directory("a")])
    with pytest.raises(ValueError, match="target"):
        cpio.symlink("l", "")
    with pytest.raises(ValueError, match="carry data"):
        cpio.Entry("d", 0o040755, b"x")
    with pytest.raises(ValueError, match="file type"):
        cpio.Entry("p", 0o010644)
    with pytest.raises(ValueError, match="8 hex"):
        cpio.write_newc([cpio.regular_file("a", b"")], mtime=1 << 32)


def test_same_input_same_bytes():
    def make():
        return cpio.write_newc([cpio.directory("x"), cpio.regular_file("x/y", b"1" * 1001)])

    assert make() == make()


needs_cpio = pytest.mark.skipif(
    shutil.which("cpio") is None, reason="cpio is not installed (Debian package cpio)"
)
needs_bsdtar = pytest.mark.skipif(
    shutil.which("bsdtar") is None,
    reason="bsdtar is not installed (Debian package libarchive-tools)",
)


@needs_cpio
def test_matches_gnu_cpio_reproducible_output(tmp_path):
    """GNU cpio --reproducible numbers inodes from 0 and zeroes the device: same bytes."""
    tree = tmp_path / "t"
    (tree / "d" / "sub").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"hello\n")
    (tree / "d" / "odd").write_bytes(b"12345")
    os.symlink("f", tree / "d" / "l")
    with_dev = os.geteuid() == 0
    if with_dev:
        os.mknod(tree / "d" / "null", 0o020666, os.makedev(1, 3))
        os.chmod(tree / "d" / "null", 0o666)
    os.chmod(tree / "d", 0o755)
    os.chmod(tree / "d" / "sub", 0o750)
    os.chmod(tree / "d" / "f", 0o644)
    os.chmod(tree / "d" / "odd", 0o755)
    names = ["d", "d/f", "d/l", "d/odd", "d/sub"] + (["d/null"] if with_dev else [])
    for n in names:
        os.utime(tree / n, (1000, 1000), follow_symlinks=False)
    gnu = subprocess.run(
        ["cpio", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
        input="\n".join(names).encode() + b"\n",
        cwd=tree,
        capture_output=True,
        check=True,
    ).stdout
    entries = [
        cpio.directory("d", 0o755),
        cpio.regular_file("d/f", b"hello\n", 0o644),
        cpio.symlink("d/l", "f"),
        cpio.regular_file("d/odd", b"12345", 0o755),
        cpio.directory("d/sub", 0o750),
    ]
    if with_dev:
        entries.append(cpio.char_device("d/null", 1, 3, 0o666))
    ours = cpio.write_newc(entries, mtime=1000)
    # GNU cpio's trailer carries mtime 0 too; it pads the archive to 512-byte blocks.
    assert gnu[: len(ours)] == ours
    assert set(gnu[len(ours) :]) <= {0}


@needs_bsdtar
def test_bsdtar_lists_what_was_written(tmp_path):
    archive = tmp_path / "a.cpio"
    archive.write_bytes(
        cpio.write_newc(
            [
                cpio.directory("dev"),
                cpio.char_device("dev/ttyS0", 4, 64, 0o660),
                cpio.regular_file("init", b"#!/bin/sh\n", 0o755),
                cpio.symlink("sh", "busybox"),
            ]
        )
    )
    out = subprocess.run(
        ["bsdtar", "-tvf", str(archive)], capture_output=True, text=True, check=True
    ).stdout
    lines = [line.split() for line in out.splitlines()]
    assert [ln[0] for ln in lines] == ["drwxr-xr-x", "crw-rw----", "-rwxr-xr-x", "lrwxrwxrwx"]
    assert lines[1][4] == "4,64" and lines[1][-1] == "dev/ttyS0"
    assert lines[3][-3:] == ["sh", "->", "busybox"]
