"""osvmm initramfs --modules: modules and their dependencies in load order (a fake
module tree, and Debian's where it is cached), decompressed, loaded by /init."""

from __future__ import annotations

import argparse
import gzip
import lzma
import shutil
from pathlib import Path

import pytest

from osvmm.boot import kmodules
from osvmm.boot.initramfs import INIT_SCRIPT, cmd_initramfs
from osvmm.errors import ConfigError
from tests.helpers import VMLINUX
from tests.test_initramfs_build import cpio_extract, fake_busybox  # noqa: F401 - fixture


@pytest.fixture
def tree(tmp_path) -> Path:
    """lib/modules/9.9.9/: a -> b -> c, a -> c, d builtin, e compressed (xz), f (gz)."""
    rel = tmp_path / "mods" / "lib" / "modules" / "9.9.9"
    (rel / "kernel" / "x").mkdir(parents=True)
    for name in "abc":
        (rel / "kernel" / "x" / f"{name}.ko").write_bytes(f"module {name}".encode())
    (rel / "kernel" / "x" / "e-e.ko.xz").write_bytes(lzma.compress(b"module e"))
    (rel / "kernel" / "x" / "f.ko.gz").write_bytes(gzip.compress(b"module f"))
    (rel / "modules.dep").write_text(
        "kernel/x/a.ko: kernel/x/b.ko kernel/x/c.ko\n"
        "kernel/x/b.ko: kernel/x/c.ko\n"
        "kernel/x/c.ko:\n"
        "kernel/x/e-e.ko.xz: kernel/x/c.ko\n"
        "kernel/x/f.ko.gz:\n"
    )
    (rel / "modules.builtin").write_text("kernel/y/d.ko\n")
    return tmp_path / "mods"


def test_load_order_puts_dependencies_first_once(tree):
    moddir = kmodules.module_dir(tree)
    assert moddir.name == "9.9.9"
    assert kmodules.load_order(moddir, ("a",)) == [
        "kernel/x/c.ko",
        "kernel/x/b.ko",
        "kernel/x/a.ko",
    ]
    assert kmodules.load_order(moddir, ("b", "a", "d", "e_e")) == [
        "kernel/x/c.ko",
        "kernel/x/b.ko",
        "kernel/x/a.ko",
        "kernel/x/e-e.ko.xz",
    ]
    with pytest.raises(ConfigError, match="--module nope: not in"):
        kmodules.load_order(moddir, ("nope",))


def test_members_are_numbered_and_decompressed(tree):
    members = kmodules.module_members(kmodules.module_dir(tree), ("e-e", "f"))
    assert members == [
        ("/lib/modules/osvmm/00-c.ko", b"module c"),
        ("/lib/modules/osvmm/01-e_e.ko", b"module e"),
        ("/lib/modules/osvmm/02-f.ko", b"module f"),
    ]


def test_a_directory_without_modules_dep(tmp_path):
    with pytest.raises(ConfigError, match="no modules.dep"):
        kmodules.module_dir(tmp_path)
    for rel in ("1.0", "2.0"):
        (tmp_path / "lib" / "modules" / rel).mkdir(parents=True)
        (tmp_path / "lib" / "modules" / rel / "modules.dep").write_text("")
    with pytest.raises(ConfigError, match="modules of 2 kernels"):
        kmodules.module_dir(tmp_path)


def test_a_corrupt_compressed_module(tree):
    moddir = kmodules.module_dir(tree)
    (moddir / "kernel" / "x" / "f.ko.gz").write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="cannot be decompressed"):
        kmodules.module_members(moddir, ("f",))


def test_init_loads_them_in_order_before_the_command():
    loop = INIT_SCRIPT.index("for osvmm_mod in /lib/modules/osvmm/*.ko")
    assert (
        INIT_SCRIPT.index("mount -t devtmpfs")
        < loop
        < INIT_SCRIPT.index('echo "osvmm-initramfs: ready"')
    )


def args(out, modules=None, module=()):
    return argparse.Namespace(
        out=str(out), busybox=None, add=[], modules=modules, module=list(module)
    )


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")
def test_the_command_adds_them(tree, tmp_path, fake_busybox, capsys):  # noqa: F811
    ns = args(tmp_path / "i.cpio", str(tree), ["a"])
    ns.busybox = str(fake_busybox)
    assert cmd_initramfs(ns) == 0
    cpio_extract(tmp_path / "i.cpio", tmp_path / "x")
    got = sorted(p.name for p in (tmp_path / "x" / "lib" / "modules" / "osvmm").iterdir())
    assert got == ["00-c.ko", "01-b.ko", "02-a.ko"]


def test_module_without_modules_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs --modules"):
        cmd_initramfs(args(tmp_path / "i.cpio", None, ["virtio_blk"]))


def test_debian_virtio_disk_modules():
    base = VMLINUX
    if not base.exists():
        pytest.skip("no Debian kernel cached (scripts/fetch-debian-kernel --modules)")
    mods = base.resolve().parent / "modules"
    if not mods.is_dir():
        pytest.skip("Debian's modules are not unpacked (scripts/fetch-debian-kernel --modules)")
    members = kmodules.module_members(kmodules.module_dir(mods), kmodules.VIRTIO_DISK_MODULES)
    names = [Path(p).name for p, _ in members]
    assert names == ["00-virtio_ring.ko", "01-virtio.ko", "02-virtio_mmio.ko", "03-virtio_blk.ko"]
    for _, data in members:
        assert data[:4] == b"\x7fELF"
    # The ACPI ID the DSDT announces the devices with is the module's own.
    mmio = dict(members)["/lib/modules/osvmm/02-virtio_mmio.ko"]
    assert b"LNRO0005" in mmio


def test_debian_virtio_mmio_takes_no_command_line_devices():
    """Why the DSDT announces the devices (docs/devices.md): Debian's virtio_mmio has no
    ``device`` parameter (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set); its .modinfo
    section (what modinfo prints) holds the ACPI alias and no parm= entry."""
    base = VMLINUX
    found = (
        list((base.resolve().parent / "modules").rglob("virtio_mmio.ko")) if base.exists() else []
    )
    if not found:
        pytest.skip("Debian's modules are not unpacked (scripts/fetch-debian-kernel --modules)")
    data = found[0].read_bytes()
    assert b"alias=acpi*:LNRO0005:*\0" in data
    assert b"parm=" not in data and b"parmtype=" not in data
    config = base.resolve().parent / f"config-{found[0].parents[3].name}"
    if config.exists():  # fetch-debian-kernel keeps the package's /boot/config-RELEASE
        text = config.read_text()
        assert "CONFIG_VIRTIO_MMIO=m" in text
        assert "# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set" in text


def test_debian_vsock_transport_comes_with_its_dependencies():
    """The guest's side of virtio-vsock (docs/devices.md): --module
    vmw_vsock_virtio_transport brings vsock and the common transport, after virtio."""
    base = VMLINUX
    mods = base.resolve().parent / "modules" if base.exists() else None
    if mods is None or not mods.is_dir():
        pytest.skip("Debian's modules are not unpacked (scripts/fetch-debian-kernel --modules)")
    moddir = kmodules.module_dir(mods)
    names = [Path(p).name for p in kmodules.load_order(moddir, kmodules.VIRTIO_VSOCK_MODULES)]
    assert names[-1] == "vmw_vsock_virtio_transport.ko", names
    for before, after in (
        ("virtio_mmio.ko", "vmw_vsock_virtio_transport.ko"),
        ("virtio.ko", "vmw_vsock_virtio_transport.ko"),
        ("vsock.ko", "vmw_vsock_virtio_transport_common.ko"),
        ("vmw_vsock_virtio_transport_common.ko", "vmw_vsock_virtio_transport.ko"),
    ):
        assert names.index(before) < names.index(after), names
