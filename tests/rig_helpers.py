"""What the rig's test files share (scripts/hwvirt-rig, docs/testing.md): an
initramfs for Debian's kernel with a script of the test's and the modules it
needs, tools/osvmm-vsock built for it, and ``osvmm run`` in the background with
its console in a file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.test_rig_linux import VMLINUX


def script_initrd(
    tmp: Path, name: str, script: str, modules: tuple[str, ...], tools: tuple[Path, ...] = ()
) -> Path:
    """``tmp``/initrd.cpio: osvmm's initramfs with ``script`` as /bin/NAME, each of
    ``tools`` in /bin, and ``modules`` (with what they depend on) from Debian's
    kernel package; skips the test where that kernel is not fetched."""
    if not VMLINUX.exists():
        pytest.skip(f"no Debian kernel at {VMLINUX}: scripts/fetch-debian-kernel --modules")
    from osvmm.boot import kmodules
    from osvmm.boot.initramfs import build_initramfs

    path = tmp / name
    path.write_text(script)
    path.chmod(0o755)
    moddir = kmodules.module_dir(VMLINUX.resolve().parent / "modules")
    return build_initramfs(
        tmp / "initrd.cpio",
        extra_files=[(path, f"/bin/{name}"), *((t, f"/bin/{t.name}") for t in tools)],
        modules=kmodules.module_members(moddir, modules),
    )


def vsock_tool(tmp: Path) -> Path:
    """tools/osvmm-vsock.c built static into ``tmp``; skips the test without gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (it builds tools/osvmm-vsock.c)")
    tool = tmp / "osvmm-vsock"
    source = REPO / "tools" / "osvmm-vsock.c"
    subprocess.run([gcc, "-static", "-O2", "-o", str(tool), str(source)], check=True)
    return tool


def osvmm_run(out: Path, *args: str) -> subprocess.Popen:
    """``osvmm run ARGS`` in the background: its stdout (the guest's console) into
    ``out``, its stderr into ``out`` with ``.err`` added: apart, as a line of the
    VMM's on stderr may come in the middle of a console line."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OSVMM_DEBUG", None)
    with open(out, "wb") as f, open(f"{out}.err", "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "osvmm.cli", "run", *args],
            stdout=f,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(REPO),
        )
