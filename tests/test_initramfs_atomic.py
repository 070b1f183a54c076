"""`osvmm initramfs OUT` replaces OUT whole or not at all: on a full file system
the OUT that was there stays, and no partial or temporary file is left."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

from tests.helpers import REPO
from tests.test_initramfs_build import fake_elf


def _initramfs_with_fsize_limit(out, busybox, limit: int) -> subprocess.CompletedProcess:
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "osvmm.cli", "initramfs", str(out), "--busybox", str(busybox)],
        capture_output=True,
        env=env,
        preexec_fn=limited,
        timeout=60,
    )


def test_initramfs_on_a_full_file_system_keeps_the_old_output(tmp_path):
    busybox = tmp_path / "busybox"
    busybox.write_bytes(fake_elf() + bytes(64 << 10))
    busybox.chmod(0o755)
    out = tmp_path / "initrd.cpio"
    out.write_bytes(b"the initramfs that works\n")
    r = _initramfs_with_fsize_limit(out, busybox, 16 << 10)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(b"osvmm: error: cannot write initramfs ")
    assert out.read_bytes() == b"the initramfs that works\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busybox", "initrd.cpio"]
    r = _initramfs_with_fsize_limit(out, busybox, 1 << 30)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:6] == b"070701"
