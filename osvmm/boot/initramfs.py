"""A minimal initramfs: Debian's static busybox and an /init that runs one command.

``build_initramfs`` writes a cpio "newc" archive (gzip-compressed when the
output name ends in ".gz") holding /bin/busybox with links for its applets, a
few device nodes, and /init (``INIT_SCRIPT``). The init mounts /proc, /sys and
/dev, prints ``osvmm-initramfs: ready``, runs the command the kernel command
line names, prints ``osvmm-initramfs: exit N`` and powers off. The command
convention is documented in ``INIT_SCRIPT`` and docs/initramfs.md.

The archive is reproducible: the same busybox and extra files give the same
bytes (fixed mtime, uid/gid 0, members in sorted order, gzip header mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from osvmm.boot import cpio
from osvmm.errors import ConfigError, ImageError
from osvmm.files import read_input
from osvmm.loader.elf import EM_X86_64, ET_DYN, ET_EXEC, PT_INTERP, parse_elf
from osvmm.loader.result import MAX_IMAGE_SIZE

DEFAULT_BUSYBOX = Path("/bin/busybox")
BUSYBOX_PACKAGE = "busybox-static"

# Applets linked in /bin: those /init uses and a small working set for commands.
APPLETS = (
    "[",
    "ash",
    "blkdiscard",
    "blockdev",
    "cat",
    "chmod",
    "cmp",
    "cp",
    "cttyhack",
    "cut",
    "date",
    "dd",
    "df",
    "dmesg",
    "echo",
    "env",
    "false",
    "free",
    "grep",
    "head",
    "hexdump",
    "hostname",
    "insmod",
    "ip",
    "kill",
    "ln",
    "ls",
    "lsmod",
    "md5sum",
    "mkdir",
    "mke2fs",
    "mknod",
    "mount",
    "mv",
    "ping",
    "poweroff",
    "printf",
    "ps",
    "pwd",
    "readlink",
    "reboot",
    "rm",
    "rmdir",
    "sed",
    "seq",
    "setsid",
    "sh",
    "sleep",
    "stat",
    "sync",
    "tail",
    "taskset",
    "tee",
    "test",
    "time",
    "top",
    "touch",
    "tr",
    "true",
    "umount",
    "uname",
    "uptime",
    "vi",
    "wc",
    "xargs",
)

# (name, perm) of the directories; /sbin, /usr/bin and /usr/sbin link to /bin.
DIRECTORIES = (
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
)
SYMLINKS = (("sbin", "bin"), ("usr/bin", "../bin"), ("usr/sbin", "../bin"))

# (name, major, minor, perm): the kernel opens /dev/console for init's stdin,
# stdout and stderr before /init runs, so that node must be in the archive;
# devtmpfs replaces all of them once /init mounts it.
DEVICE_NODES = (
    ("dev/console", 5, 1, 0o600),
    ("dev/null", 1, 3, 0o666),
    ("dev/tty", 5, 0, 0o666),
    ("dev/ttyS0", 4, 64, 0o660),
    ("dev/zero", 1, 5, 0o666),
)

READY_LINE = "osvmm-initramfs: ready"

INIT_SCRIPT = """\
#!/bin/sh
# /init of the osvmm initramfs (written by osvmm/boot/initramfs.py).
#
# The command comes from the kernel command line, first match wins:
#   1. the words after "--": Linux passes them to /init as its arguments,
#      e.g.  console=ttyS0 -- sh -c "uname -a; cat /proc/cpuinfo"
#   2. osvmm.run="shell command" read from /proc/cmdline and run by sh -c,
#      e.g.  console=ttyS0 osvmm.run="uname -a; cat /proc/cpuinfo"
#      (the value ends at the next double quote; unquoted, at the next space)
#   3. none: an interactive shell on the console.
# Then "osvmm-initramfs: exit N" with the command's status, and poweroff -f.

export PATH=/bin:/sbin HOME=/root

mount -t proc proc /proc || echo "osvmm-initramfs: cannot mount /proc"
mount -t sysfs sysfs /sys || echo "osvmm-initramfs: cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || echo "osvmm-initramfs: cannot mount /dev"

# Kernel modules added with --modules, in load order (osvmm/boot/kmodules.py).
for osvmm_mod in /lib/modules/osvmm/*.ko; do
	[ -e "$osvmm_mod" ] || continue
	insmod "$osvmm_mod" || echo "osvmm-initramfs: insmod $osvmm_mod failed"
done

# Print the osvmm.run= value of the command line $1; fail if there is none.
osvmm_run_value() {
\tosvmm_rest=" $1 "
\tcase $osvmm_rest in
\t*' osvmm.run="'*)
\t\tosvmm_rest=${osvmm_rest#*' osvmm.run="'}
\t\tprintf '%s\\n' "${osvmm_rest%%\\"*}"
\t\t;;
\t*' osvmm.run='*)
\t\tosvmm_rest=${osvmm_rest#*' osvmm.run='}
\t\tprintf '%s\\n' "${osvmm_rest%% *}"
\t\t;;
\t*)
\t\treturn 1
\t\t;;
\tesac
}

osvmm_cmdline=
read -r osvmm_cmdline < /proc/cmdline
osvmm_run=$(osvmm_run_value "$osvmm_cmdline")

echo "osvmm-initramfs: ready"
if [ "$#" -gt 0 ]; then
\t"$@"
\tosvmm_status=$?
elif [ -n "$osvmm_run" ]; then
\tsh -c "$osvmm_run"
\tosvmm_status=$?
else
\tsetsid cttyhack sh
\tosvmm_status=$?
fi
echo "osvmm-initramfs: exit $osvmm_status"
sync
poweroff -f
echo "osvmm-initramfs: poweroff failed"
exit "$osvmm_status"
"""


def check_static_elf(data: bytes, path: Path) -> None:
    """Raise ImageError unless ``data`` is an x86-64 ELF executable without PT_INTERP."""
    elf = parse_elf(data, f"busybox {path}", e_types=(ET_EXEC, ET_DYN))
    if elf.elf_class != 64 or elf.ehdr.e_machine != EM_X86_64:
        raise ImageError(f"busybox {path} is not an x86-64 ELF executable")
    if any(ph.p_type == PT_INTERP for ph in elf.phdrs):
        raise ImageError(
            f"busybox {path} is dynamically linked (has PT_INTERP); "
            f"the initramfs needs the static one from Debian package {BUSYBOX_PACKAGE}"
        )


def read_busybox(busybox_path: str | os.PathLike | None = None) -> bytes:
    """The bytes of a static x86-64 busybox (default /bin/busybox), checked."""
    path = Path(busybox_path) if busybox_path is not None else DEFAULT_BUSYBOX
    if not path.exists():
        hint = (
            f"; install Debian package {BUSYBOX_PACKAGE} (apt-get install -y {BUSYBOX_PACKAGE})"
            if busybox_path is None
            else f" (the static busybox of Debian package {BUSYBOX_PACKAGE} is {DEFAULT_BUSYBOX})"
        )
        raise ImageError(f"busybox not found: {path}{hint}")
    data = read_input(path, f"busybox {path}", MAX_IMAGE_SIZE, ImageError)
    check_static_elf(data, path)
    return data


def parse_add_spec(spec: str) -> tuple[Path, str]:
    """``SRC:DEST`` (DEST absolute in the initramfs) -> (SRC, DEST); ConfigError if bad."""
    src, sep, dest = spec.rpartition(":")
    if not sep or not src or not dest:
        raise ConfigError(f"bad --add {spec!r}: expected SRC:DEST, e.g. ./hello:/bin/hello")
    _archive_name(dest, spec)
    return Path(src), dest


def _archive_name(dest: str, what: str) -> str:
    """An absolute initramfs path as a cpio member name ("/bin/x" -> "bin/x")."""
    if not dest.startswith("/"):
        raise ConfigError(f"bad --add {what!r}: DEST must be an absolute path in the initramfs")
    name = dest.strip("/")
    try:
        cpio.check_name(name)
    except ValueError:
        raise ConfigError(
            f"bad --add {what!r}: DEST {dest!r} must name a file below /, without . or .."
        ) from None
    return name


def _base_entries(busybox: bytes) -> dict[str, cpio.Entry]:
    entries = [cpio.directory(name, perm) for name, perm in DIRECTORIES]
    entries += [cpio.symlink(name, target) for name, target in SYMLINKS]
    entries += [cpio.char_device(n, major, minor, perm) for n, major, minor, perm in DEVICE_NODES]
    entries.append(cpio.regular_file("bin/busybox", busybox, 0o755))
    entries += [cpio.symlink(f"bin/{applet}", "busybox") for applet in APPLETS]
    entries.append(cpio.regular_file("init", INIT_SCRIPT.encode(), 0o755))
    return {e.name: e for e in entries}


def _host_entries(src: Path, name: str, spec: str) -> list[cpio.Entry]:
    """Members for the host file or tree ``src`` placed at ``name``, in sorted order.

    The tree is walked with a stack, not by recursion (a tree a thousand levels deep
    is a tree, not a crash), and an unreadable directory or link is a ConfigError."""
    out: list[cpio.Entry] = []
    todo = [(src, name)]
    while todo:
        path, member = todo.pop()
        try:
            st = path.lstat()
            perm = 0o755 if st.st_mode & 0o111 else 0o644
            if stat.S_ISREG(st.st_mode):
                label = f"bad --add {spec!r}: {path}"
                data = read_input(path, label, MAX_IMAGE_SIZE, ConfigError)
                out.append(cpio.regular_file(member, data, perm))
            elif stat.S_ISLNK(st.st_mode):
                out.append(cpio.symlink(member, os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                out.append(cpio.directory(member, stat.S_IMODE(st.st_mode)))
                children = sorted(os.listdir(path), reverse=True)
                todo += [(path / child, f"{member}/{child}") for child in children]
            else:
                raise ConfigError(f"bad --add {spec!r}: {path} is not a file, symlink or directory")
        except OSError as e:
            raise ConfigError(f"bad --add {spec!r}: {path}: {e.strerror or e}") from None
    return out


def initramfs_entries(
    busybox: bytes,
    extra_files: Iterable[tuple[str | os.PathLike, str]] = (),
    modules: Iterable[tuple[str, bytes]] = (),
) -> list[cpio.Entry]:
    """The members, parents before children; an extra file replaces a base file.
    ``modules``: (path, bytes) of kernel modules (boot/kmodules.py module_members)."""
    entries = _base_entries(busybox)
    for dest, data in modules:
        name = dest.lstrip("/")
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, cpio.directory(parent))
        entries[name] = cpio.regular_file(name, data, 0o644)
    for src, dest in extra_files:
        spec = f"{src}:{dest}"
        name = _archive_name(dest, spec)
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            existing = entries.get(parent)
            if existing is None:
                entries[parent] = cpio.directory(parent)
            elif not existing.is_dir:
                raise ConfigError(f"bad --add {spec!r}: /{parent} is not a directory")
        for e in _host_entries(Path(src), name, spec):
            old = entries.get(e.name)
            if old is not None and old.is_dir != e.is_dir:
                what = "directory" if old.is_dir else "non-directory"
                raise ConfigError(f"bad --add {spec!r}: /{e.name} would replace a {what}")
            entries[e.name] = e
    return [entries[k] for k in sorted(entries, key=lambda n: n.split("/"))]


def build_initramfs(
    out_path: str | os.PathLike,
    busybox_path: str | os.PathLike | None = None,
    extra_files: Iterable[tuple[str | os.PathLike, str]] = (),
    modules: Iterable[tuple[str, bytes]] = (),
) -> Path:
    """Write the initramfs to ``out_path`` (gzip when it ends in ".gz"); return its path.

    ``extra_files`` are (host source, absolute initramfs path) pairs; a source
    directory is added with its contents; a source that names an existing
    file (such as /init) replaces it. ``modules``: kernel modules /init loads, in
    order (boot/kmodules.py ``module_members``).
    """
    out = Path(out_path)
    entries = initramfs_entries(read_busybox(busybox_path), extra_files, modules)
    archive = cpio.write_newc(entries)
    if out.name.endswith(".gz"):
        archive = gzip.compress(archive, compresslevel=9, mtime=0)
    # A temporary file beside OUT, renamed over it once whole: a full file system
    # (or any failure) leaves the OUT that was there, and no partial file.
    import tempfile

    mask = os.umask(0o022)
    os.umask(mask)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(archive)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~mask)  # as a plain create would have made it
        os.replace(tmp, out)
        tmp = None
    except OSError as e:
        raise ConfigError(f"cannot write initramfs {out}: {e.strerror}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return out


def add_initramfs_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``osvmm initramfs OUT [--busybox PATH] [--add SRC:DEST ...]``."""
    p = subparsers.add_parser(
        "initramfs",
        help="build a busybox initramfs that runs one command (docs/initramfs.md)",
        description=(
            "Build a cpio newc initramfs from Debian's static busybox. Its /init runs the "
            'words after "--" on the kernel command line (or osvmm.run="..."), '
            "prints its exit status and powers off."
        ),
    )
    p.add_argument("out", metavar="OUT", help='output file; gzip-compressed if it ends in ".gz"')
    p.add_argument(
        "--busybox",
        metavar="PATH",
        default=None,
        help=f"static busybox to use (default {DEFAULT_BUSYBOX}, package {BUSYBOX_PACKAGE})",
    )
    p.add_argument(
        "--add",
        metavar="SRC:DEST",
        action="append",
        default=[],
        help="add host file or directory SRC at absolute path DEST (repeatable)",
    )
    p.add_argument(
        "--modules",
        metavar="DIR",
        help="a kernel's modules (a depmod base such as scripts/fetch-debian-kernel "
        "--modules prints, or its lib/modules/RELEASE): /init loads --module NAMEs and "
        "their dependencies from it; without --module, virtio_mmio and virtio_blk "
        "(a disk: docs/devices.md)",
    )
    p.add_argument(
        "--module",
        metavar="NAME",
        action="append",
        default=[],
        help="a module to load at boot, with its dependencies (repeatable; needs --modules)",
    )
    p.set_defaults(func=cmd_initramfs)
    return p


def cmd_initramfs(args: argparse.Namespace) -> int:
    extra = [parse_add_spec(spec) for spec in args.add]
    modules = []
    if args.module and not args.modules:
        raise ConfigError("--module: needs --modules DIR (the kernel's modules)")
    if args.modules:
        from osvmm.boot import kmodules

        wanted = tuple(args.module) or kmodules.VIRTIO_DISK_MODULES
        modules = kmodules.module_members(kmodules.module_dir(args.modules), wanted)
    out = build_initramfs(args.out, args.busybox, extra, modules)
    print(f"{out} ({out.stat().st_size} bytes)")
    return 0
