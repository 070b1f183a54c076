"""Kernel modules for an initramfs: named modules and their dependencies, in load
order, from a kernel's module tree (``depmod``'s modules.dep).

``scripts/fetch-debian-kernel --modules`` unpacks Debian's kernel package's
modules into ``kernel/ABI/modules/`` and indexes them; that directory (a depmod
base: ``DIR/lib/modules/RELEASE/modules.dep``) or the release directory itself
is what ``osvmm initramfs --modules DIR`` takes. A module built into the kernel
(modules.builtin) needs no loading and is left out. A compressed module (.ko.xz,
.ko.gz) is decompressed, so busybox's insmod can load it.
"""

from __future__ import annotations

import gzip
import lzma
import re
from pathlib import Path

from osvmm.errors import ConfigError
from osvmm.files import read_input

# What a disk needs in a guest of a Debian kernel (CONFIG_VIRTIO_MMIO=m,
# CONFIG_VIRTIO_BLK=m): the virtio-mmio transport and the block driver; virtio and
# virtio_ring come as their dependencies.
VIRTIO_DISK_MODULES = ("virtio_mmio", "virtio_blk")
# What vsock needs (CONFIG_VIRTIO_VSOCKETS=m): the transport; vsock and
# vmw_vsock_virtio_transport_common come as its dependencies.
VIRTIO_VSOCK_MODULES = ("virtio_mmio", "vmw_vsock_virtio_transport")
MAX_MODULE_SIZE = 64 << 20


def _name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def module_dir(path: str | Path) -> Path:
    """The directory holding modules.dep: ``path`` itself, or the one release under
    ``path/lib/modules``."""
    base = Path(path)
    if (base / "modules.dep").is_file():
        return base
    under = base / "lib" / "modules"
    releases = sorted(p for p in under.glob("*") if (p / "modules.dep").is_file())
    if len(releases) == 1:
        return releases[0]
    if not releases:
        raise ConfigError(
            f"--modules {path}: no modules.dep in it or under lib/modules/ "
            "(scripts/fetch-debian-kernel --modules makes one)"
        )
    raise ConfigError(
        f"--modules {path}: modules of {len(releases)} kernels under lib/modules/: "
        "name one release directory"
    )


def load_order(moddir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Paths (relative to ``moddir``) of ``wanted`` and their dependencies, each
    after what it depends on; a module built into the kernel is left out."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[_name(path)] = (path, rest.split())
    builtin_file = moddir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {_name(p) for p in builtin_file.read_text().split()}
    order: list[str] = []
    stack: list[tuple[str, bool]] = [(_name(n), False) for n in reversed(wanted)]
    visiting: set[str] = set()
    while stack:  # depth first, without recursion
        name, done = stack.pop()
        if done:
            visiting.discard(name)
            if deps[name][0] not in order:
                order.append(deps[name][0])
            continue
        if name not in deps:
            if name in builtin:
                continue
            raise ConfigError(f"--module {name}: not in {moddir}/modules.dep")
        if deps[name][0] in order or name in visiting:
            continue
        visiting.add(name)
        stack.append((name, True))
        stack += [(_name(d), False) for d in reversed(deps[name][1])]
    return order


def module_members(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(initramfs path, bytes) of each module to load, ``/lib/modules/osvmm/NN-name.ko``
    in load order (what /init loads, sorted by name)."""
    out = []
    for i, rel in enumerate(load_order(moddir, wanted)):
        path = moddir / rel
        data = read_input(path, f"module {path}", MAX_MODULE_SIZE, ConfigError)
        try:
            if rel.endswith(".ko.xz"):
                data = lzma.decompress(data)
            elif rel.endswith(".ko.gz"):
                data = gzip.decompress(data)
            elif not rel.endswith(".ko"):
                raise ConfigError(f"module {path}: not a .ko, .ko.xz or .ko.gz file")
        except (lzma.LZMAError, OSError, EOFError) as err:
            raise ConfigError(f"module {path}: cannot be decompressed: {err}") from None
        if not re.fullmatch(r"[A-Za-z0-9_-]+", _name(rel)):
            raise ConfigError(f"module {path}: an odd file name")
        out.append((f"/lib/modules/osvmm/{i:02d}-{_name(rel)}.ko", data))
    return out
