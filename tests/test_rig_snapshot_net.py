"""A Linux partition's virtio-net NIC on a host tap goes on after a snapshot and a
restore, inside the rig (scripts/hwvirt-rig, docs/testing.md; docs/snapshots.md).

The tap (persistent, made with ``ip tuntap add``), its address, both osvmm runs
and everything the guest reaches live in a network namespace the test makes, as
in tests/test_rig_virtio.py. Debian's kernel with its virtio_mmio and virtio_net
modules pings the host's end once per line (``NET i ok`` or ``NET i lost``);
``osvmm run --snapshot DIR --snapshot-stop`` gets SIGUSR2 after a few lines and
``osvmm run --restore DIR`` (the tap attached again) goes on: every count comes
once, in order, and the pings after the restore are answered.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, run_osvmm, tap_in_netns
from tests.rig_helpers import script_initrd
from tests.test_rig_linux import BOOT_TIMEOUT, VMLINUX, wait_for

pytestmark = pytest.mark.rig

TAP = "osvmmsnap0"
NETNS = "osvmm-snapnet"
LINES = 30
BEFORE = 6
LINE = re.compile(r"NET (\d+) (ok|lost)\n")

SCRIPT = r"""#!/bin/sh
ip link set eth0 up && ip addr add 10.98.0.2/24 dev eth0
i=0
while [ $i -lt "$1" ]; do
    i=$((i+1))
    if ping -c 1 -W 3 10.98.0.1 >/dev/null 2>&1; then
        echo "NET $i ok"
    else
        echo "NET $i lost"
    fi
    sleep 0.3
done
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snapnet")
    return tmp, script_initrd(tmp, "netloop", SCRIPT, ("virtio_mmio", "virtio_net"))


@pytest.fixture
def netns():
    with tap_in_netns(NETNS, TAP, "10.98.0.1/24") as inside:
        yield inside


def text(path: Path) -> str:
    return path.read_bytes().decode(errors="replace").replace("\r", "") if path.exists() else ""


def test_a_linux_nic_on_a_tap_goes_on_after_a_snapshot_and_a_restore(files, netns):
    tmp, initrd = files
    snap, first = tmp / "snap", tmp / "first.out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OSVMM_DEBUG", None)
    argv = [
        *netns,
        sys.executable,
        "-m",
        "osvmm.cli",
        "run",
        "--kernel",
        str(VMLINUX),
        "--initrd",
        str(initrd),
        "--memory",
        "256M",
        "--net",
        f"tap={TAP}",
        "--append",
        f"console=ttyS0 panic=-1 quiet -- /bin/netloop {LINES}",
        "--snapshot",
        str(snap),
        "--snapshot-stop",
    ]
    with open(first, "wb") as out, open(f"{first}.err", "wb") as err:
        run = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    try:
        wait_for(
            f"{BEFORE} lines",
            lambda: len(LINE.findall(text(first))) >= BEFORE,
            BOOT_TIMEOUT,
            abort=lambda: None if run.poll() is None else text(first)[-3000:],
        )
        run.send_signal(signal.SIGUSR2)
        assert run.wait(120) == 0, text(first)[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    before = LINE.findall(text(first))
    assert before and all(ok == "ok" for _, ok in before), text(first)[-3000:]
    r = run_osvmm("run", "--restore", str(snap), timeout=300, prefix=netns)
    second = r.stdout.decode(errors="replace").replace("\r", "")
    assert r.returncode == 0, (second[-3000:], r.stderr.decode(errors="replace"))
    assert "osvmm-initramfs: exit 0" in second, second[-3000:]
    lines = LINE.findall(text(first) + second)
    assert [int(n) for n, _ in lines] == list(range(1, LINES + 1)), lines
    after = lines[len(before) :]
    # The line the snapshot was in may have lost its ping (the VMM stopped under it);
    # every later one is answered.
    assert len(after) >= 10 and all(ok == "ok" for _, ok in after[1:]), lines
    print(f"\nbefore the snapshot {len(before)} lines, after the restore {len(after)}: {after[:3]}")
