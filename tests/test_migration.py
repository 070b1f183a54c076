"""Live migration between two VMMs (needs /dev/kvm): pre-copy rounds with KVM's dirty
log while the guest rewrites its memory (the memtouch guest checks every page
itself), the counter going on through ``osvmm migrate`` and ``osvmm up --incoming``,
and every failure (nowhere to go, a destination that refuses, a connection that
drops) leaving the source running as it was."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from osvmm.errors import SnapshotError
from osvmm.plan.config import parse_plan
from osvmm.plan.placement import place
from osvmm.plan.topology import read_topology
from osvmm.up.hypercalls import serve_supervisor
from osvmm.up.migrate import IncomingServer, MigrationService
from osvmm.up.supervisor import RUNNING, STOPPED, Supervisor
from tests.helpers import REPO, end_all, guest_text, run_osvmm

pytestmark = pytest.mark.kvm

MEMTOUCH_PASS = 0x200000


def plan(tmp, name: str, memory: str, image: str, cmdline: str) -> str:
    return (
        f'[vmm]\ncontrol_socket = "{tmp}/{name}.sock"\n'
        f'[[partition]]\nname = "{name}"\ncpus = "floating"\nmemory = "{memory}"\n'
        f'image = "{image}"\ncmdline = "{cmdline}"\n'
    )


class Vmm:
    """A supervisor with its hypercall monitor and migration service, in process."""

    def __init__(
        self, tmp: Path, body: str, incoming: str | None = None, log_dir: str | None = None
    ):
        self.sup = Supervisor(place(parse_plan(body, tmp), read_topology()), log_dir=log_dir)
        self.live = serve_supervisor(self.sup)
        self.migrations = MigrationService(self.sup, self.live)
        self.receiver = None
        if incoming:
            self.receiver = IncomingServer(incoming, self.sup, self.sup.kvm)
            self.receiver.start()
        else:
            self.sup.start_all()

    def wait_running(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.sup.partitions[name].state != RUNNING:
            assert time.monotonic() < deadline, self.sup.partitions[name].reason
            time.sleep(0.02)

    def u64(self, name: str, gpa: int) -> int:
        return struct.unpack("<Q", self.sup.partitions[name].partition.read_guest(gpa, 8))[0]

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        self.sup.close()
        self.live.close()


@pytest.fixture
def tmp():
    path = Path(tempfile.mkdtemp(prefix="osvmm-mig-", dir="/tmp"))  # short socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_until(pred, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def host_dirty_ring() -> int:
    """The largest dirty ring this host's KVM offers per vCPU (0: none)."""
    from osvmm.kvm.ioctls import KVM_CAP_DIRTY_LOG_RING
    from osvmm.kvm.system import Kvm

    kvm = Kvm()
    try:
        return kvm.check_extension(KVM_CAP_DIRTY_LOG_RING)
    finally:
        kvm.close()


# OSVMM_DIRTY_RING: unset (the default ring), the smallest ring KVM takes (one page:
# full after about 192 pages, so the vCPU exits KVM_EXIT_DIRTY_RING_FULL many times
# a round), or 0 (the dirty bitmap, as on a host without the ring).
@pytest.mark.parametrize("ring", [None, "4096", "0"], ids=["default", "small-ring", "bitmap"])
def test_pre_copy_rounds_while_the_guest_rewrites_its_memory(tmp, monkeypatch, ring):
    if ring is None:
        monkeypatch.delenv("OSVMM_DIRTY_RING", raising=False)
    else:
        monkeypatch.setenv("OSVMM_DIRTY_RING", ring)
    has_ring = host_dirty_ring() >= 4096 and ring != "0"
    if ring == "4096" and not has_ring:
        pytest.skip("this host's KVM has no dirty ring")
    cmdline = "mib=24 wait_us=2000 every=1000000"
    src = Vmm(tmp, plan(tmp, "touch", "64M", "guests:memtouch", cmdline))
    addr = f"unix:{tmp}/in.sock"
    dst = Vmm(tmp, plan(tmp, "touch", "64M", "guests:memtouch", cmdline), incoming=addr)
    try:
        src.wait_running("touch")
        wait_until(lambda: src.u64("touch", MEMTOUCH_PASS) >= 3)
        answer = src.migrations.migrate({"name": "touch", "to": addr, "downtime_ms": 1})
        assert answer["state"] == STOPPED
        assert answer["rounds"] >= 2  # the dirty log sent more than the first copy
        assert answer["downtime_ms"] > 0 and answer["pages"] >= 24 << 8
        assert answer["bytes"] > 24 << 20
        assert src.sup.partitions["touch"].reason == f"migrated to {addr}"
        assert answer["dirty_log"] == ("dirty ring" if has_ring else "dirty bitmap")
        if ring == "4096":  # the ring filled, and was emptied, many times
            assert answer["ring_full_exits"] > 0, answer
        elif not has_ring:
            assert answer["ring_full_exits"] == 0, answer
        # (the default ring, 4096 pages, may fill too: a pass writes 6144 pages)
        dst.wait_running("touch")
        # The arrival has the same dirty log (it can migrate again).
        assert dst.sup.partitions["touch"].partition.dirty_log == answer["dirty_log"]
        # Its VM was made while the pages came (vmm/ready.py), not in the downtime.
        assert dst.sup.partitions["touch"].partition.built_ready
        at = dst.u64("touch", MEMTOUCH_PASS)
        # The guest checks every page it rewrites: a page the migration lost ends it.
        wait_until(lambda: dst.u64("touch", MEMTOUCH_PASS) >= at + 20)
        assert dst.sup.partitions["touch"].state == RUNNING, dst.sup.partitions["touch"].reason
    finally:
        src.close()
        dst.close()


def test_nowhere_to_go_and_a_dropped_connection_leave_the_source_running(tmp):
    src = Vmm(tmp, plan(tmp, "touch", "32M", "guests:memtouch", "mib=8 every=1000000"))
    try:
        src.wait_running("touch")
        part = src.sup.partitions["touch"].partition
        with pytest.raises(SnapshotError, match="cannot reach the destination"):
            src.migrations.migrate({"name": "touch", "to": f"unix:{tmp}/none"})

        # A destination that says OKAY, takes some pages, then goes away.
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(f"{tmp}/drop.sock")
        listener.listen(1)

        def drop():
            conn, _ = listener.accept()
            header = conn.recv(12)
            conn.recv(struct.unpack("<4sQ", header)[1], socket.MSG_WAITALL)
            body = b"{}"
            conn.sendall(struct.pack("<4sQ", b"OKAY", len(body)) + body)
            conn.recv(1 << 20)
            conn.close()

        threading.Thread(target=drop, daemon=True).start()
        with pytest.raises(SnapshotError, match="failed"):
            src.migrations.migrate({"name": "touch", "to": f"unix:{tmp}/drop.sock"})
        listener.close()
        assert src.sup.partitions["touch"].state == RUNNING
        assert src.sup.partitions["touch"].partition is part  # the very same run
        assert not part.slots.log_dirty and part.memory.written_pages is None
        at = src.u64("touch", MEMTOUCH_PASS)
        wait_until(lambda: src.u64("touch", MEMTOUCH_PASS) >= at + 20)  # its pages all checked
        assert src.sup.partitions["touch"].state == RUNNING
    finally:
        src.close()


def test_a_destination_that_refuses_leaves_both_as_they_were(tmp):
    src = Vmm(tmp, plan(tmp, "counter", "8M", "guests:counter", ""))
    addr = f"unix:{tmp}/in.sock"
    dst = Vmm(tmp, plan(tmp, "counter", "16M", "guests:counter", ""), incoming=addr)
    try:
        src.wait_running("counter")
        with pytest.raises(SnapshotError, match="the destination refused: .*16 MiB"):
            src.migrations.migrate({"name": "counter", "to": addr})
        assert src.sup.partitions["counter"].state == RUNNING
        assert dst.sup.partitions["counter"].state == STOPPED
        at = src.u64("counter", 0x200000)
        wait_until(lambda: src.u64("counter", 0x200000) > at)
    finally:
        src.close()
        dst.close()


# -- through the command line ----------------------------------------------------------------

EVERY = 1 << 23


def up_process(plan_path: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OSVMM_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "osvmm.cli", "up", str(plan_path), "-q", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=str(REPO),
    )


def counter_lines(path: Path) -> list[int]:
    return (
        [int(n) for n in re.findall(r"counter: (\d+)\n", path.read_text())] if path.exists() else []
    )


def test_osvmm_migrate_to_osvmm_up_incoming(tmp):
    procs = []
    try:
        for side in ("src", "dst"):
            (tmp / f"{side}.toml").write_text(
                f'[vmm]\ncontrol_socket = "{tmp}/{side}.sock"\nlog_dir = "{tmp}/{side}-logs"\n'
                '[[partition]]\nname = "counter"\ncpus = "floating"\nmemory = "16M"\n'
                f'image = "guests:counter"\ncmdline = "every={EVERY}"\n'
            )
        procs.append(up_process(tmp / "src.toml"))
        procs.append(up_process(tmp / "dst.toml", "--incoming", f"unix:{tmp}/in.sock"))
        wait_until(lambda: (tmp / "src.sock").exists() and (tmp / "in.sock").exists())
        src_log, dst_log = (
            tmp / "src-logs/counter.console.log",
            tmp / "dst-logs/counter.console.log",
        )
        wait_until(lambda: len(counter_lines(src_log)) >= 2, 60)

        nowhere = run_osvmm(
            "migrate", "counter", "--to", f"unix:{tmp}/nowhere", "--socket", f"{tmp}/src.sock"
        )
        assert nowhere.returncode == 2 and "cannot reach the destination" in nowhere.stderr.decode()
        assert len(nowhere.stderr.decode().splitlines()) == 1

        r = run_osvmm(
            "migrate", "counter", "--to", f"unix:{tmp}/in.sock", "--socket", f"{tmp}/src.sock"
        )
        assert r.returncode == 0, r.stderr
        assert re.match(
            rb"counter: migrated to unix:.* in \d+ rounds \(dirty (ring|bitmap)\), "
            rb"[\d.]+ MiB sent, \d+ ms, "
            rb"downtime [\d.]+ ms; here stopped\n",
            r.stdout,
        ), r.stdout
        wait_until(lambda: len(counter_lines(dst_log)) >= 2, 60)
    finally:
        end_all(procs)
    # The guest may be paused in the middle of a line: its first part ends the
    # source's log (before the VMM's note), the rest begins the destination's.
    text = guest_text(src_log) + guest_text(dst_log)
    lines = [int(n) for n in re.findall(r"counter: (\d+)\n", text)]
    assert lines == [EVERY * (lines[0] // EVERY + i) for i in range(len(lines))], lines
