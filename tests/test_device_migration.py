"""Live migration and takeover of partitions with devices (needs /dev/kvm): the
``virtioblk`` guest writes and reads back its disk round after round while it is
migrated between two ``osvmm up`` processes on this host (the same image: the
source releases its lock at stop-and-copy, the destination takes it), or taken
over by a new VMM (the image's descriptor, its lock with it, and the vsock's
listening socket handed over): every round runs once and the disk ends as a
run without either leaves it. And the failures: a destination whose disk has
another size refuses in one line before anything moves; a destination that
cannot open its devices, or drops the connection, after the source released
its devices leaves the source running with its image locked again and its
vsock listening again. The
``virtiovsock`` guest, taken over or migrated while it waits for the host, is
reached through the same socket path at the new VMM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from osvmm.errors import SnapshotError
from osvmm.up.supervisor import RUNNING
from tests.helpers import VMM_NOTE, end_all, guest_text, listening, locked, run_osvmm
from tests.test_migration import Vmm, up_process, wait_until
from tests.test_virtio_guest import ROUNDS, SECTORS, _round_lines, check_disk_and_rounds

pytestmark = pytest.mark.kvm


@pytest.fixture
def tmp():
    path = Path(tempfile.mkdtemp(prefix="osvmm-dm-", dir="/tmp"))  # short socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_image(path: Path, sectors: int = SECTORS) -> Path:
    path.write_bytes(b"osvmm disk image".ljust(512, b"\0") + bytes(512 * (sectors - 1)))
    return path


def disk_plan(tmp: Path, side: str, image: Path, vsock: Path | None = None) -> str:
    return (
        f'[vmm]\ncontrol_socket = "{tmp}/{side}.sock"\nlog_dir = "{tmp}/{side}-logs"\n'
        '[[partition]]\nname = "d"\ncpus = "floating"\nmemory = "16M"\n'
        f'image = "guests:virtioblk"\ncmdline = "rounds={ROUNDS}"\ndrives = ["{image}"]\n'
        'restart = "stop"\n' + (f'vsock = "uds={vsock},cid=5"\n' if vsock else "")
    )


def log_until(path: Path, needle: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.05)
    return text


def test_osvmm_migrate_moves_a_disk_guest_mid_run_to_osvmm_up_incoming(tmp):
    image = make_image(tmp / "disk.img")
    bigger = make_image(tmp / "bigger.img", SECTORS + 8)
    (tmp / "src.toml").write_text(disk_plan(tmp, "src", image))
    (tmp / "dst.toml").write_text(disk_plan(tmp, "dst", image))  # the same disk: shared
    (tmp / "big.toml").write_text(disk_plan(tmp, "big", bigger))
    src_log, dst_log = tmp / "src-logs/d.console.log", tmp / "dst-logs/d.console.log"
    procs = []
    try:
        procs.append(up_process(tmp / "src.toml"))
        # The source holds the image locked: a destination's plan check does not mind.
        procs.append(up_process(tmp / "dst.toml", "--incoming", f"unix:{tmp}/in.sock"))
        procs.append(up_process(tmp / "big.toml", "--incoming", f"unix:{tmp}/big.sock"))
        wait_until(lambda: all((tmp / f"{n}.sock").exists() for n in ("src", "in", "big")), 60)
        log_until(src_log, "virtioblk: round 100 ok")

        # A destination whose disk has another size: refused before anything moves.
        r = run_osvmm("migrate", "d", "--to", f"unix:{tmp}/big.sock", "--socket", f"{tmp}/src.sock")
        err = r.stderr.decode()
        assert r.returncode == 2 and len(err.splitlines()) == 1, err
        assert f"disk 0 {bigger} has {512 * (SECTORS + 8)} bytes, the migrated one" in err, err
        assert locked(image)  # the source's still
        at = len(_round_lines(guest_text(src_log)))
        wait_until(lambda: len(_round_lines(guest_text(src_log))) > at, 120)  # it goes on

        r = run_osvmm("migrate", "d", "--to", f"unix:{tmp}/in.sock", "--socket", f"{tmp}/src.sock")
        assert r.returncode == 0, r.stderr
        assert re.match(rb"d: migrated to unix:.*; here stopped\n", r.stdout), r.stdout
        assert locked(image)  # the destination's now (its guest still has rounds to go)
        log_until(dst_log, f"virtioblk: rounds {ROUNDS} done", 300)
    finally:
        end_all(procs)
    src_text = guest_text(src_log)
    assert f"rounds {ROUNDS} done" not in src_text  # it ended at the destination
    check_disk_and_rounds(src_text + guest_text(dst_log), image)


def logged_vmm(tmp: Path, body: str, side: str, incoming: str | None = None) -> Vmm:
    """tests/test_migration.py's Vmm, its consoles logged in ``tmp/SIDE-logs``."""
    return Vmm(tmp, body, incoming, log_dir=str(tmp / f"{side}-logs"))


def test_a_destination_that_cannot_open_its_devices_leaves_the_source_with_them(tmp):
    """The destination accepts, takes the pages and the state, but cannot listen on
    its vsock's path (another program does) when it builds the partition, after
    the source released its devices: it answers FAIL, and the source locks its
    image and listens on its socket again and goes on; the destination runs nothing."""
    image = make_image(tmp / "disk.img")
    vsock, taken = tmp / "v.sock", tmp / "taken.sock"
    squatter = socket.socket(socket.AF_UNIX)
    squatter.bind(str(taken))
    squatter.listen(1)
    addr = f"unix:{tmp}/in.sock"
    src = logged_vmm(tmp, disk_plan(tmp, "src", image, vsock), "src")
    dst = logged_vmm(tmp, disk_plan(tmp, "dst", image, taken), "dst", addr)
    log = tmp / "src-logs/d.console.log"
    try:
        src.wait_running("d")
        part = src.sup.partitions["d"].partition
        log_until(log, "virtioblk: round 100 ok")
        with pytest.raises(SnapshotError, match=f"uds={taken}: another process listens there"):
            src.migrations.migrate({"name": "d", "to": addr})
        assert src.sup.partitions["d"].partition is part and part.running
        assert locked(image) and listening(vsock)
        assert dst.sup.partitions["d"].state != RUNNING
        text = log_until(log, f"virtioblk: rounds {ROUNDS} done", 300)
    finally:
        squatter.close()
        src.close()
        dst.close()
    check_disk_and_rounds(guest_text_of(text), image)


def test_a_connection_dropped_after_the_release_leaves_the_source_with_its_devices(tmp):
    """A destination that takes everything up to DONE, checks that the source let the
    image go, and hangs up: the source locks its image again, listens on its vsock
    again, and the guest goes on to the end."""
    image = make_image(tmp / "disk.img")
    vsock = tmp / "v.sock"
    src = logged_vmm(tmp, disk_plan(tmp, "src", image, vsock), "src")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{tmp}/drop.sock")
    listener.listen(1)
    seen = {}

    def destination():
        conn, _ = listener.accept()
        with conn:
            while True:
                kind, length = struct.unpack("<4sQ", conn.recv(12, socket.MSG_WAITALL))
                while length:
                    length -= len(conn.recv(min(length, 1 << 20)))
                if kind == b"HELO":
                    conn.sendall(struct.pack("<4sQ", b"OKAY", 2) + b"{}")
                if kind == b"DONE":
                    seen["locked"] = locked(image)
                    seen["vsock"] = vsock.exists()
                    return

    try:
        src.wait_running("d")
        part = src.sup.partitions["d"].partition
        log = tmp / "src-logs/d.console.log"
        log_until(log, "virtioblk: round 100 ok")
        assert locked(image) and listening(vsock)
        threading.Thread(target=destination, daemon=True).start()
        with pytest.raises(SnapshotError, match="failed"):
            src.migrations.migrate({"name": "d", "to": f"unix:{tmp}/drop.sock"})
        assert seen == {"locked": False, "vsock": False}  # released before DONE
        assert src.sup.partitions["d"].state == RUNNING
        assert src.sup.partitions["d"].partition is part  # the very same run
        assert locked(image) and listening(vsock)  # taken back
        text = log_until(log, f"virtioblk: rounds {ROUNDS} done", 300)
    finally:
        listener.close()
        src.close()
    check_disk_and_rounds(guest_text_of(text), image)


def guest_text_of(text: str) -> str:
    return VMM_NOTE.sub("", text)


def disk_and_vsock_plan(image: Path, vsock: Path) -> str:
    """A plan's partition ``d``: the virtioblk guest on ``image``, with a vsock."""
    return (
        '[[partition]]\nname = "d"\ncpus = "floating"\nmemory = "16M"\n'
        f'image = "guests:virtioblk"\ncmdline = "rounds={ROUNDS}"\ndrives = ["{image}"]\n'
        f'restart = "stop"\nvsock = "uds={vsock},cid=5"\n'
    )


def test_a_new_vmm_takes_over_a_disk_guest_and_its_vsock(tmp):
    from tests.test_supervisor_up import UpProcess

    image = make_image(tmp / "disk.img")
    vsock = tmp / "v.sock"
    old = UpProcess(disk_and_vsock_plan(image, vsock))
    new_up = False
    try:
        log = old.logs / "d.console.log"
        log_until(log, "virtioblk: round 100 ok")
        r = run_osvmm("up", "-d", str(old.plan), "--takeover", timeout=120)
        assert r.returncode == 0, r.stderr
        new_up = True
        assert old.proc.wait(30) == 0  # the old VMM ended by itself
        new_pid = int(re.search(rb"pid (\d+)", r.stderr).group(1))
        # The image the new VMM has open is locked (the lock came with the descriptor),
        # the socket file is still there and it listens on it.
        assert locked(image) and listening(vsock)
        fds = [os.readlink(f"/proc/{new_pid}/fd/{n}") for n in os.listdir(f"/proc/{new_pid}/fd")]
        assert str(image) in fds
        text = log_until(log, f"virtioblk: rounds {ROUNDS} done", 300)
        assert "took over 1 partitions" in (old.logs / "osvmm.log").read_text()
    finally:
        if new_up:
            run_osvmm("down", "--socket", old.sock)
        old.close()
    check_disk_and_rounds(guest_text_of(text), image)


@pytest.mark.parametrize("how", ["takeover", "migrate"])
def test_a_vsock_guest_moved_mid_run_is_reached_through_its_socket_again(tmp, how):
    """The ``virtiovsock`` guest has echoed the host's listener and waits for the
    host's connection to its port 5000: once its VMM is replaced (or it migrated to
    an ``osvmm up --incoming`` on the same socket path), the host connects through
    the same path, to the new VMM, and the guest echoes it."""
    from tests.test_virtio_vsock_guest import SENT, echo_listener

    path = tmp / "v.sock"

    def body(side: str) -> str:
        return (
            f'[vmm]\ncontrol_socket = "{tmp}/{side}.sock"\nlog_dir = "{tmp}/{side}-logs"\n'
            '[[partition]]\nname = "vs"\ncpus = "floating"\nmemory = "8M"\n'
            'image = "guests:virtiovsock"\ncmdline = "listen=5000"\nrestart = "stop"\n'
            f'vsock = {{ uds = "{path}", cid = 5 }}\n'
        )

    srv, got, thread = echo_listener(f"{path}_6000")
    procs, down = [], []
    (tmp / "src.toml").write_text(body("src"))
    (tmp / "dst.toml").write_text(body("dst"))
    src_log = tmp / "src-logs/vs.console.log"
    dst_log = src_log if how == "takeover" else tmp / "dst-logs/vs.console.log"
    try:
        procs.append(up_process(tmp / "src.toml"))
        if how == "migrate":
            procs.append(up_process(tmp / "dst.toml", "--incoming", f"unix:{tmp}/in.sock"))
            wait_until(lambda: (tmp / "in.sock").exists(), 60)
        log_until(src_log, f"virtiovsock: echoed 8 rounds, {SENT} bytes ok")
        thread.join(30)
        assert not thread.is_alive() and len(b"".join(got)) == SENT  # that stream closed
        time.sleep(0.5)  # the guest saw the end of it
        if how == "takeover":
            r = run_osvmm("up", "-d", str(tmp / "src.toml"), "--takeover", timeout=120)
            assert r.returncode == 0, r.stderr
            down.append(f"{tmp}/src.sock")
            assert procs[0].wait(30) == 0  # the old VMM ended, the socket file stays
        else:
            r = run_osvmm(
                "migrate", "vs", "--to", f"unix:{tmp}/in.sock", "--socket", f"{tmp}/src.sock"
            )
            assert r.returncode == 0, r.stderr
        host = socket.socket(socket.AF_UNIX)
        host.settimeout(60)
        host.connect(str(path))
        host.sendall(b"CONNECT 5000\n")
        reader = host.makefile("rb")
        assert reader.readline().startswith(b"OK ")
        host.sendall(b"hello again\n")
        assert reader.readline() == b"hello again\n"
        host.shutdown(socket.SHUT_WR)
        assert reader.read() == b""
        text = log_until(dst_log, "virtiovsock: closed")
        assert "echoed 12 bytes" in text and "FAIL" not in text, text
    finally:
        for sock in down:
            run_osvmm("down", "--socket", sock)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        srv.close()


def test_a_takeover_whose_plan_names_another_disk_leaves_the_old_vmm_with_its_devices(tmp):
    """The new plan names another image of the same size for the partition: the
    new VMM refuses it at the HELO (not the running partition's file), in one line;
    the old VMM goes on, its image locked, its socket file there and listened on,
    and the guest does every round once."""
    from tests.test_supervisor_up import UpProcess

    image, other = make_image(tmp / "disk.img"), make_image(tmp / "other.img")
    vsock = tmp / "v.sock"
    old = UpProcess(disk_and_vsock_plan(image, vsock))
    try:
        log = old.logs / "d.console.log"
        log_until(log, "virtioblk: round 100 ok")
        before = old.ps()["d"]
        plan = old.dir / "other.toml"
        plan.write_text(old.plan.read_text().replace(str(image), str(other)))
        r = run_osvmm("up", str(plan), "--takeover", timeout=120)
        err = r.stderr.decode()
        assert r.returncode == 2 and len(err.splitlines()) == 1, err
        assert f"disk 0 {other} is not the running partition's ({image})" in err, err
        assert old.proc.poll() is None
        after = old.ps()["d"]
        assert after["state"] == "running" and after["tids"] == before["tids"]  # the same run
        assert locked(image) and not locked(other) and listening(vsock)
        text = log_until(log, f"virtioblk: rounds {ROUNDS} done", 300)
    finally:
        old.close()
    check_disk_and_rounds(guest_text_of(text), image)
