"""build_initramfs: contents checked with GNU cpio and bsdtar, /init run in a chroot."""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from osvmm.boot import initramfs
from osvmm.boot.initramfs import (
    APPLETS,
    build_initramfs,
    cmd_initramfs,
    initramfs_entries,
    parse_add_spec,
    read_busybox,
)
from osvmm.errors import ConfigError, ImageError

needs_cpio = pytest.mark.skipif(
    shutil.which("cpio") is None, reason="cpio is not installed (Debian package cpio)"
)
needs_bsdtar = pytest.mark.skipif(
    shutil.which("bsdtar") is None,
    reason="bsdtar is not installed (Debian package libarchive-tools)",
)
is_root = os.geteuid() == 0


def fake_elf(
    *, interp: bool = False, elf_class: int = 2, machine: int = 62, e_type: int = 2
) -> bytes:
    """A minimal ELF-64 (or ELF-32) header with a PT_LOAD (and optionally a PT_INTERP) header."""
    phdrs = [1] + ([3] if interp else [])
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + b"\0" * 9
    head = (ident, e_type, machine, 1, 0x401000)  # e_ident .. e_entry
    if elf_class == 1:  # Elf32_Ehdr, Elf32_Phdr (p_type, ..., p_flags at 24)
        ehdr = struct.pack("<16sHHIIIIIHHHHHH", *head, 52, 0, 0, 52, 32, len(phdrs), 40, 0, 0)
        return ehdr + b"".join(struct.pack("<I20xI4x", t, 5) for t in phdrs) + b"payload"
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", *head, 64, 0, 0, 64, 56, len(phdrs), 64, 0, 0)
    return ehdr + b"".join(struct.pack("<II48x", t, 5) for t in phdrs) + b"payload"


@pytest.fixture
def fake_busybox(tmp_path) -> Path:
    p = tmp_path / "fake-busybox"
    p.write_bytes(fake_elf())
    p.chmod(0o755)
    return p


@pytest.fixture
def real_busybox() -> Path:
    try:
        read_busybox()
    except ImageError as e:
        pytest.skip(str(e))
    return initramfs.DEFAULT_BUSYBOX


def cpio_extract(archive: Path, dest: Path) -> None:
    dest.mkdir()
    with archive.open("rb") as f:
        subprocess.run(
            ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
            stdin=f,
            cwd=dest,
            check=True,
            capture_output=True,
        )


def bsdtar_list(archive: Path) -> dict[str, list[str]]:
    out = subprocess.run(
        ["bsdtar", "-tvf", str(archive)], capture_output=True, text=True, check=True
    ).stdout
    rows = {}
    for line in out.splitlines():
        cols = line.split()
        if "->" in cols:
            rows[cols[-3]] = cols
        else:
            rows[cols[-1]] = cols
    return rows


# ---- contents ---------------------------------------------------------------


@needs_cpio
@pytest.mark.skipif(not is_root, reason="extracting device nodes with cpio needs root")
def test_cpio_extracts_the_expected_tree(tmp_path, fake_busybox):
    archive = build_initramfs(tmp_path / "initrd.cpio", fake_busybox)
    root = tmp_path / "root"
    cpio_extract(archive, root)

    assert (root / "bin/busybox").read_bytes() == fake_busybox.read_bytes()
    assert stat.S_IMODE((root / "bin/busybox").stat().st_mode) == 0o755
    for applet in ("sh", "mount", "echo", "cat", "poweroff", "reboot", "sleep", "ls", "uname",
                   "dmesg", "setsid", "cttyhack", "sync"):  # fmt: skip
        assert os.readlink(root / "bin" / applet) == "busybox", applet
    assert os.readlink(root / "sbin") == "bin"
    assert os.readlink(root / "usr/bin") == "../bin"

    init = root / "init"
    assert stat.S_IMODE(init.stat().st_mode) == 0o755
    assert init.read_text().startswith("#!/bin/sh\n")
    for d in ("proc", "sys", "dev", "tmp", "root", "etc", "bin"):
        assert (root / d).is_dir() and not (root / d).is_symlink(), d
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777

    for name, major, minor in (("console", 5, 1), ("null", 1, 3), ("ttyS0", 4, 64)):
        st = (root / "dev" / name).lstat()
        assert stat.S_ISCHR(st.st_mode), name
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor)
    assert stat.S_IMODE((root / "dev/console").lstat().st_mode) == 0o600


@needs_bsdtar
def test_bsdtar_lists_devices_links_and_modes(tmp_path, fake_busybox):
    rows = bsdtar_list(build_initramfs(tmp_path / "initrd.cpio", fake_busybox))
    assert rows["dev/console"][0] == "crw-------" and rows["dev/console"][4] == "5,1"
    assert rows["dev/null"][0] == "crw-rw-rw-" and rows["dev/null"][4] == "1,3"
    assert rows["dev/ttyS0"][4] == "4,64"
    assert rows["init"][0] == "-rwxr-xr-x"
    assert rows["bin/busybox"][0] == "-rwxr-xr-x"
    assert rows["bin/sh"][0].startswith("l") and rows["bin/sh"][-1] == "busybox"
    assert {f"bin/{a}" for a in APPLETS} <= rows.keys()
    assert all(r[2] == "0" and r[3] == "0" for r in rows.values())  # uid, gid
    names = list(rows)
    for name in names:  # every parent comes before its children
        parent = name.rpartition("/")[0]
        assert not parent or names.index(parent) < names.index(name)


@needs_bsdtar
def test_gzip_output_is_the_same_archive_and_bsdtar_reads_it(tmp_path, fake_busybox):
    plain = build_initramfs(tmp_path / "i.cpio", fake_busybox).read_bytes()
    gz = build_initramfs(tmp_path / "i.cpio.gz", fake_busybox)
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(gz.read_bytes()) == plain
    assert "init" in bsdtar_list(gz)


def test_building_twice_gives_identical_bytes(tmp_path, fake_busybox):
    extra = tmp_path / "hello"
    extra.write_text("hi\n")
    for name in ("a.cpio", "a.cpio.gz"):
        one = build_initramfs(tmp_path / f"1{name}", fake_busybox, [(extra, "/x/hello")])
        os.utime(extra, (5, 5))
        two = build_initramfs(tmp_path / f"2{name}", fake_busybox, [(extra, "/x/hello")])
        assert one.read_bytes() == two.read_bytes()


def test_init_is_valid_sh(tmp_path):
    init = tmp_path / "init"
    init.write_text(initramfs.INIT_SCRIPT)
    subprocess.run(["sh", "-n", str(init)], check=True)
    if os.path.exists(initramfs.DEFAULT_BUSYBOX):
        subprocess.run([str(initramfs.DEFAULT_BUSYBOX), "sh", "-n", str(init)], check=True)
    assert initramfs.READY_LINE in initramfs.INIT_SCRIPT
    assert 'echo "osvmm-initramfs: exit $osvmm_status"' in initramfs.INIT_SCRIPT


# ---- /init, run in a chroot of the extracted archive with stubbed commands --------

STUBS = """\
mount() { echo "stub-mount $*"; }
sync() { echo stub-sync; }
setsid() { echo "stub-setsid $*"; return 7; }
poweroff() { echo "stub-poweroff $*"; exit 0; }
reboot() { echo "stub-reboot $*"; exit 0; }
"""


def _can_sandbox() -> str | None:
    if not is_root:
        return "running /init in a chroot needs root"
    if shutil.which("unshare") is None or shutil.which("chroot") is None:
        return "unshare/chroot are not installed (util-linux, coreutils)"
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount", "true"], capture_output=True)
    if r.returncode != 0:
        return "cannot create PID and mount namespaces here"
    return None


@pytest.fixture
def init_root(tmp_path, real_busybox):
    reason = _can_sandbox()
    if reason:
        pytest.skip(reason)
    if shutil.which("cpio") is None:
        pytest.skip("cpio is not installed (Debian package cpio)")
    root = tmp_path / "root"
    cpio_extract(build_initramfs(tmp_path / "i.cpio", real_busybox), root)
    (root / "stubs.sh").write_text(STUBS)
    return root


def run_init(root: Path, cmdline: str, *args: str) -> list[str]:
    """Run the archive's /init under its own busybox sh, in a chroot.

    mount, sync, setsid and poweroff are shell functions (they win over busybox's
    applets); the run is in fresh PID and mount namespaces as a second guard,
    where a real reboot(2) would end only the namespace.
    """
    (root / "proc" / "cmdline").write_text(cmdline + "\n")
    r = subprocess.run(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount",
            "chroot",
            str(root),
            "/bin/sh",
            "-c",
            ". /stubs.sh; . /init",
            "init",
            *args,
        ],  # fmt: skip
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == [
        "stub-mount -t proc proc /proc",
        "stub-mount -t sysfs sysfs /sys",
        "stub-mount -t devtmpfs devtmpfs /dev",
    ]
    assert lines[3] == "osvmm-initramfs: ready"
    assert lines[-2:] == ["stub-sync", "stub-poweroff -f"]
    return lines[4:-2]


def test_init_runs_the_words_after_dashes(init_root):
    out = run_init(init_root, "console=ttyS0 -- sh -c x", "sh", "-c", 'echo "a  b"; exit 5')
    assert out == ["a  b", "osvmm-initramfs: exit 5"]


def test_init_arguments_win_over_osvmm_run(init_root):
    out = run_init(init_root, 'osvmm.run="echo no" -- echo yes', "echo", "yes")
    assert out == ["yes", "osvmm-initramfs: exit 0"]


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ('BOOT_IMAGE=/vmlinuz console=ttyS0 osvmm.run="echo hi  there; exit 3" quiet',
         ["hi there", "osvmm-initramfs: exit 3"]),
        ('osvmm.run="uname -s"', ["Linux", "osvmm-initramfs: exit 0"]),
        ("console=ttyS0 osvmm.run=true panic=-1", ["osvmm-initramfs: exit 0"]),
        ("osvmm.run=uname console=ttyS0", ["Linux", "osvmm-initramfs: exit 0"]),
        ("osvmm.run=false", ["osvmm-initramfs: exit 1"]),
        ("osvmm.run=/no/such/cmd", ["osvmm-initramfs: exit 127"]),
        ("xosvmm.run=false console=ttyS0",
         ["stub-setsid cttyhack sh", "osvmm-initramfs: exit 7"]),
    ],
)  # fmt: skip
def test_init_runs_osvmm_run_from_proc_cmdline(init_root, cmdline, expected):
    assert run_init(init_root, cmdline) == expected


def test_init_without_command_starts_a_console_shell(init_root):
    out = run_init(init_root, "console=ttyS0 root=/dev/ram0")
    assert out == ["stub-setsid cttyhack sh", "osvmm-initramfs: exit 7"]


# ---- extra files --------------------------------------------------------------


@needs_cpio
def test_extra_files_directories_and_replacing_init(tmp_path, fake_busybox):
    prog = tmp_path / "prog"
    prog.write_bytes(b"\x7fELF...")
    prog.chmod(0o700)
    conf = tmp_path / "conf"
    conf.write_text("k=v\n")
    conf.chmod(0o600)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("f\n")
    os.symlink("sub/f", tree / "link")
    my_init = tmp_path / "my-init"
    my_init.write_text("#!/bin/sh\necho mine\n")
    extra = [
        (prog, "/bin/prog"),
        (conf, "/opt/a/b/conf"),
        (tree, "/data"),
        (my_init, "/init"),
    ]
    root = tmp_path / "root"
    cpio_extract(build_initramfs(tmp_path / "i.cpio", fake_busybox, extra), root)
    assert stat.S_IMODE((root / "bin/prog").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "opt/a/b/conf").stat().st_mode) == 0o644
    assert (root / "opt/a/b").is_dir()
    assert (root / "data/sub/f").read_text() == "f\n"
    assert os.readlink(root / "data/link") == "sub/f"
    assert (root / "init").read_text() == "#!/bin/sh\necho mine\n"
    assert stat.S_IMODE((root / "init").stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("dest", "match"),
    [
        ("bin/x", "absolute"),
        ("/", "below /"),
        ("/a/../b", "below /"),
        ("/bin/sh/x", "/bin/sh is not a directory"),
        ("/bin", "replace a directory"),
    ],
)
def test_bad_extra_destinations(tmp_path, fake_busybox, dest, match):
    src = tmp_path / "f"
    src.write_text("x")
    with pytest.raises(ConfigError, match=match):
        build_initramfs(tmp_path / "i.cpio", fake_busybox, [(src, dest)])
    assert not (tmp_path / "i.cpio").exists()


def test_missing_extra_source(tmp_path, fake_busybox):
    with pytest.raises(ConfigError, match="No such file"):
        build_initramfs(tmp_path / "i.cpio", fake_busybox, [(tmp_path / "nope", "/x")])


@pytest.mark.parametrize(
    "spec", ["nocolon", ":/bin/x", "src:", "src:bin/x", "src:/a/./b", "src:/.."]
)
def test_bad_add_spec(spec):
    with pytest.raises(ConfigError, match="bad --add"):
        parse_add_spec(spec)


def test_add_spec_splits_at_the_last_colon():
    assert parse_add_spec("a:b/c:/bin/c") == (Path("a:b/c"), "/bin/c")


# ---- busybox errors -------------------------------------------------------------


def test_missing_default_busybox_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(initramfs, "DEFAULT_BUSYBOX", tmp_path / "bin" / "busybox")
    with pytest.raises(ImageError, match="apt-get install -y busybox-static") as e:
        build_initramfs(tmp_path / "i.cpio")
    assert "\n" not in str(e.value)


def test_missing_given_busybox(tmp_path):
    with pytest.raises(ImageError, match="busybox not found: .*nope.*busybox-static"):
        build_initramfs(tmp_path / "i.cpio", tmp_path / "nope")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (fake_elf(interp=True), "dynamically linked .*busybox-static"),
        (b"#!/bin/sh\necho busybox\n", "not an ELF"),
        (fake_elf(elf_class=1, machine=3), "not an x86-64"),
        (fake_elf(machine=183), "not an x86-64"),
        (fake_elf()[:80], "program headers .* lie outside the file"),
        (fake_elf()[:40], "truncated ELF header"),
        (fake_elf(e_type=1), "not an executable ELF"),
    ],
    ids=["dynamic", "script", "i386", "aarch64", "cut-phdrs", "cut-ehdr", "object"],
)
def test_unusable_busybox(tmp_path, data, match):
    bb = tmp_path / "busybox"
    bb.write_bytes(data)
    with pytest.raises(ImageError, match=match):
        build_initramfs(tmp_path / "i.cpio", bb)


def test_a_static_pie_busybox_is_accepted(tmp_path):
    bb = tmp_path / "busybox"
    bb.write_bytes(fake_elf(e_type=3))  # ET_DYN without PT_INTERP: a static PIE
    assert read_busybox(bb) == bb.read_bytes()


def test_a_dynamic_host_binary_is_refused(tmp_path):
    ls = Path(shutil.which("ls") or "/bin/ls").resolve()
    if b"ld-linux" not in ls.read_bytes()[:4096]:
        pytest.skip(f"{ls} is not dynamically linked here")
    with pytest.raises(ImageError, match="dynamically linked"):
        build_initramfs(tmp_path / "i.cpio", ls)


# ---- the CLI subcommand -------------------------------------------------------------


def _cli(argv):
    parser = argparse.ArgumentParser(prog="osvmm")
    initramfs.add_initramfs_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_builds_and_prints_path_and_size(tmp_path, fake_busybox, capsys):
    f = tmp_path / "hello"
    f.write_text("hi\n")
    out = tmp_path / "initrd.cpio.gz"
    argv = ["initramfs", str(out), "--busybox", str(fake_busybox), "--add", f"{f}:/hello"]
    assert _cli(argv) == 0
    assert capsys.readouterr().out == f"{out} ({out.stat().st_size} bytes)\n"
    assert b"hello" in gzip.decompress(out.read_bytes())


def test_cli_bad_add_is_a_config_error(tmp_path, fake_busybox):
    args = argparse.Namespace(out=str(tmp_path / "i"), busybox=str(fake_busybox), add=["x"])
    with pytest.raises(ConfigError, match="expected SRC:DEST"):
        cmd_initramfs(args)


def test_a_tree_deeper_than_the_recursion_limit_is_added(tmp_path, fake_busybox):
    # The limit is lowered to 100 frames above this one rather than the tree made over
    # 1000 deep: such a tree outlives the test (shutil.rmtree, and pytest's clean-up of
    # old temporary directories, recurse too).
    import inspect
    import sys

    depth = 150
    tree = tmp_path / "deep"
    tree.joinpath(*["d"] * depth).mkdir(parents=True)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 100)
    try:
        entries = initramfs_entries(b"busybox", [(tree, "/deep")])
    finally:
        sys.setrecursionlimit(old)
    assert sum(1 for e in entries if e.name.startswith("deep")) == depth + 1


def test_an_unreadable_directory_in_a_tree_is_a_config_error(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    (tree / "locked").mkdir(parents=True)
    real = os.listdir

    def listdir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr("osvmm.boot.initramfs.os.listdir", listdir)
    with pytest.raises(ConfigError, match=r"bad --add .*locked: Permission denied"):
        initramfs_entries(b"busybox", [(tree, "/t")])
