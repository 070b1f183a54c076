"""A Linux partition writing its virtio-blk disk goes on writing and reading it after
a snapshot and a restore, inside the rig (scripts/hwvirt-rig, docs/testing.md;
docs/snapshots.md).

Debian's stock kernel, with its own virtio_mmio and virtio_blk modules from the
initramfs, runs a loop: line ``i`` writes ``DISK <i>`` into a sector of /dev/vda
(``i % 64 + 8``, fsync), drops the page cache, reads the sector back from the
device and prints ``COUNT i <what it read>``. ``osvmm run --snapshot DIR
--snapshot-stop`` is sent SIGUSR2 after a few lines; ``osvmm run --restore DIR``
goes on. Every count comes once, in order, each read back what it wrote, the
restored run ends as the loop does, and the image holds each sector's last line.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from osvmm.boot import kmodules
from tests.helpers import run_osvmm
from tests.rig_helpers import osvmm_run, script_initrd
from tests.test_rig_linux import BOOT_TIMEOUT, VMLINUX, wait_for

pytestmark = pytest.mark.rig

LINES = 40  # the loop's length
BEFORE = 8  # lines before the snapshot
SECTORS = 64
LINE = re.compile(r"COUNT (\d+) (\S*)\n")

SCRIPT = r"""#!/bin/sh
i=0
while [ $i -lt "$1" ]; do
    i=$((i+1)); s=$((i % 64 + 8))
    printf 'DISK%08d' $i | dd of=/dev/vda bs=512 seek=$s conv=sync,fsync 2>/dev/null
    echo 3 > /proc/sys/vm/drop_caches
    echo "COUNT $i $(dd if=/dev/vda bs=512 skip=$s count=1 2>/dev/null | head -c 12)"
    sleep 0.3
done
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snapdisk")
    initrd = script_initrd(tmp, "diskloop", SCRIPT, kmodules.VIRTIO_DISK_MODULES)
    (tmp / "disk.img").write_bytes(bytes((SECTORS + 16) * 512))
    return tmp, initrd


def text(path: Path) -> str:
    return path.read_bytes().decode(errors="replace").replace("\r", "") if path.exists() else ""


def test_a_linux_disk_goes_on_after_a_snapshot_and_a_restore(files):
    tmp, initrd = files
    snap, first, second = tmp / "snap", tmp / "first.out", tmp / "second.out"
    run = osvmm_run(
        first,
        "--kernel",
        str(VMLINUX),
        "--initrd",
        str(initrd),
        "--memory",
        "256M",
        "--drive",
        str(tmp / "disk.img"),
        "--append",
        f"console=ttyS0 panic=-1 quiet -- /bin/diskloop {LINES}",
        "--snapshot",
        str(snap),
        "--snapshot-stop",
    )
    try:
        wait_for(
            f"{BEFORE} lines",
            lambda: len(LINE.findall(text(first))) >= BEFORE,
            BOOT_TIMEOUT,
            abort=lambda: (
                None
                if run.poll() is None
                else f"osvmm ended: {text(first)[-2000:]}" + text(Path(f"{first}.err"))
            ),
        )
        run.send_signal(signal.SIGUSR2)
        assert run.wait(120) == 0, text(first)[-2000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    errors = Path(f"{first}.err")
    assert "osvmm: snapshot in" in text(errors), text(first)[-2000:] + text(errors)
    t0 = time.monotonic()
    r = run_osvmm("run", "--restore", str(snap), timeout=300)
    second.write_bytes(r.stdout + r.stderr)
    out = text(first) + r.stdout.decode(errors="replace").replace("\r", "")
    assert r.returncode == 0, (out[-3000:], r.stderr.decode(errors="replace"))
    assert "osvmm-initramfs: exit 0" in out, out[-3000:]
    lines = [(int(n), got) for n, got in LINE.findall(out)]
    assert [n for n, _ in lines] == list(range(1, LINES + 1)), out[-3000:]
    assert all(got == f"DISK{n:08d}" for n, got in lines), lines
    n_first = len(LINE.findall(text(first)))
    assert BEFORE <= n_first < LINES, n_first  # lines on both sides of the snapshot
    image = (tmp / "disk.img").read_bytes()
    for n in range(max(1, LINES - SECTORS + 1), LINES + 1):
        s = n % SECTORS + 8
        assert image[s * 512 : s * 512 + 12] == f"DISK{n:08d}".encode(), n
    print(f"\nrestored run: {time.monotonic() - t0:.1f} s, {LINES - n_first} lines after it")
