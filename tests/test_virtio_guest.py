"""virtio-blk end to end under KVM: the bundled ``virtioblk`` guest drives the
first virtio-mmio device at CPL0 (probe, features, queue, GET_ID, read, write,
flush, read back, an out-of-range read), its QueueNotify stores reach the
device through a KVM ioeventfd without an exit to the VMM, and its interrupts
come through a KVM irqfd on I/O APIC pin 5."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from osvmm.guests import resolve_image
from osvmm.machine import Machine
from osvmm.plan.drives import Drive
from osvmm.vmm.partition import Partition, PartitionConfig
from tests.helpers import run_osvmm

pytestmark = pytest.mark.kvm

PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(512))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"osvmm disk image".ljust(512, b"\0") + bytes(512 * 7))
    return path


def check_disk_and_rounds(text: str, image: Path) -> None:
    """The virtioblk guest ran every round once, in order, and left the disk as a
    run without interruption leaves it."""
    assert "FAIL" not in text, text
    assert _round_lines(text) == list(range(50, ROUNDS + 1, 50)), text  # no gap, no repeat
    assert f"virtioblk: rounds {ROUNDS} done" in text
    disk = image.read_bytes()
    for sector, block in _final_sectors().items():
        assert disk[sector * 512 : (sector + 1) * 512] == block, sector


def test_the_guest_reads_writes_and_flushes_its_disk(image):
    r = run_osvmm("run", "guests:virtioblk", "--drive", str(image), timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 1, (out, r.stderr.decode())  # debug exit 0
    lines = out.splitlines()
    assert lines[:4] == [
        "virtioblk: id osvmm-vda",
        "virtioblk: sector 0 osvmm disk image",
        "virtioblk: write 0",
        "virtioblk: readback ok",
    ]
    interrupts, requests = (int(w) for w in lines[4].split()[2::2])
    assert requests == 6 and 1 <= interrupts <= requests
    assert image.read_bytes()[512:1024] == PATTERN


def test_a_read_only_disk_refuses_the_write(image):
    before = image.read_bytes()
    r = run_osvmm(
        "run", "guests:virtioblk", "--drive", f"{image},ro", "--append", "rw=0", timeout=120
    )
    out = r.stdout.decode()
    assert r.returncode == 1, (out, r.stderr.decode())
    assert "virtioblk: write 1\n" in out  # VIRTIO_BLK_S_IOERR
    assert "virtioblk: readback unchanged\n" in out
    assert image.read_bytes() == before


def test_notifications_bypass_the_vcpu_loop_and_work_is_off_the_vcpu_thread(image):
    config = PartitionConfig(
        Machine.build(16 << 20, 1, virtio_mmio=1),
        image=resolve_image("guests:virtioblk"),
        drives=(Drive(str(image)),),
    )
    part = Partition(config).build()
    try:
        (dev,) = part.virtio.devices
        transport = dev.transport
        reached_bus, served_on = [], []
        real_notified, real_process = transport._notified, transport.process

        def notified(index):
            reached_bus.append(index)
            real_notified(index)

        def process(index):
            served_on.append(threading.current_thread().name)
            real_process(index)

        transport._notified = notified
        transport.process = process
        part.start()
        result = part.wait(120)
        assert result is not None and result.status == 1, result
        assert transport.model.requests == 6
        assert reached_bus == []  # every QueueNotify went to the ioeventfd
        assert served_on and set(served_on) == {dev.thread.name}
        assert not set(served_on) & {t._thread.name for t in part.threads}  # no vCPU's
        assert part.mmio.unclaimed == {}
    finally:
        part.close()


def _disk_partition(image, **kw) -> Partition:
    out = []
    config = PartitionConfig(
        Machine.build(16 << 20, 1, virtio_mmio=1),
        image=resolve_image("guests:virtioblk"),
        drives=(Drive(str(image)),),
        console=out.append,
        **kw,
    )
    part = Partition(config).build()
    part.output = out
    return part


def test_a_kept_partition_boots_again_with_its_disk_reset(image):
    part = _disk_partition(image, reusable=True)
    try:
        for boot in range(2):
            part.output.clear()
            part.start()
            result = part.wait(120)
            assert result is not None and result.status == 1, (boot, result)
            text = b"".join(part.output).decode()
            assert "virtioblk: readback ok" in text, (boot, text)
            part.recycle()
        assert part.virtio.devices[0].transport.model.requests == 12
    finally:
        part.close()


def _wait_text(part, needle: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while needle not in b"".join(part.output).decode():
        assert part.running, b"".join(part.output).decode()
        assert time.monotonic() < deadline, b"".join(part.output).decode()
        time.sleep(0.01)


ROUNDS = 1000
SECTORS = 8  # the image fixture's: rounds write sectors 2..7 in turn


def _final_sectors(rounds: int = ROUNDS) -> dict[int, bytes]:
    """Each round sector's content after ``rounds`` rounds of the guest."""
    out = {}
    for r in range(rounds):
        block = bytearray((r * 13 + i) & 0xFF for i in range(512))
        block[:8] = r.to_bytes(8, "little")
        out[2 + r % (SECTORS - 2)] = bytes(block)
    return out


def _round_lines(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"virtioblk: round (\d+) ok\n", text)]


def test_a_disk_guest_snapshotted_mid_run_goes_on_after_the_restore(image, tmp_path):
    """The guest writes and reads back its disk, round after round: a snapshot
    without --stop lets it go on, one with --stop is resumed in a new partition
    (the disk reopened), by the CLI too with a copy of the disk in its place;
    every round is done once, and the disk ends as a run without a snapshot
    leaves it."""
    from osvmm.snapshot import format as fmt
    from osvmm.vmm.snapshot import Snapshot, snapshot_drives

    part = _disk_partition(image, cmdline=f"rounds={ROUNDS}")
    snap_dir, at_snapshot = tmp_path / "snap", tmp_path / "at-snapshot.img"
    try:
        part.start()
        _wait_text(part, "virtioblk: round 100 ok")
        part.snapshot(str(tmp_path / "first"))  # and it goes on
        _wait_text(part, "virtioblk: round 300 ok")

        def then():
            part.stop(0, "stopped after a snapshot")
            at_snapshot.write_bytes(image.read_bytes())  # the devices are quiesced

        part.snapshot(str(snap_dir), then=then)
        part.wait(10)
        first = b"".join(part.output).decode()
    finally:
        part.close()
    assert "FAIL" not in first and f"rounds {ROUNDS} done" not in first
    assert (snap_dir / "state").read_bytes()[8:12] == (2).to_bytes(4, "little")
    state = fmt.decode((snap_dir / "state").read_bytes())
    (dev,) = state["virtio"]
    assert dev["model"]["path"] == str(image) and dev["queues"][0]["ready"]

    snap = Snapshot.read(str(snap_dir))
    out = []
    back = Partition(
        PartitionConfig(
            snap.machine, restore=snap, drives=snapshot_drives(snap.state), console=out.append
        )
    ).build()
    try:
        back.start()
        result = back.wait(300)
        assert result is not None and result.status == 1, (result, b"".join(out).decode())
    finally:
        back.close()
        snap.close()
    check_disk_and_rounds(first + b"".join(out).decode(), image)
    disk = image.read_bytes()

    # The CLI: the same snapshot, a copy of the disk as it was at the snapshot.
    r = run_osvmm("run", "--restore", str(snap_dir), "--drive", str(at_snapshot), timeout=300)
    out_cli = r.stdout.decode()
    assert r.returncode == 1, (out_cli, r.stderr.decode())
    assert f"virtioblk: rounds {ROUNDS} done" in out_cli and "FAIL" not in out_cli
    assert at_snapshot.read_bytes() == disk
    # A disk of another size is refused in one line, before anything runs.
    bigger = tmp_path / "bigger.img"
    bigger.write_bytes(bytes(512 * (SECTORS + 8)))
    r = run_osvmm("run", "--restore", str(snap_dir), "--drive", str(bigger), timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"" and "Traceback" not in err, err
    assert err.splitlines() == [
        f"osvmm: error: partition 'guest': disk 0 {bigger}: {512 * (SECTORS + 8)} bytes, "
        f"the snapshot's disk ({image}) had {512 * SECTORS}: a restore needs the same disk"
    ]
    # And a plan's restore with it, before anything starts.
    sock = tmp_path / "s.sock"
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[vmm]\ncontrol_socket = "{sock}"\n[[partition]]\nname = "d"\ncpus = "floating"\n'
        f'memory = "16M"\nimage = "guests:virtioblk"\ndrives = ["{bigger}"]\n'
        f'restore = "{snap_dir}"\n'
    )
    r = run_osvmm("up", str(plan), "--log-dir", str(tmp_path / "logs"), timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"partition 'd': restore: disk 0 {bigger}: " in err, err
    assert not sock.exists() and not (tmp_path / "logs").exists()


def test_a_partition_with_a_tap_nic_and_a_vsock_is_snapshotted_and_restored(image, tmp_path):
    """A NIC and a vsock the guest leaves alone beside the disk it uses: the snapshot
    holds the tap and MAC, the vsock's socket and CID; the restore attaches the tap
    again (made anew: the first run's went with it), listens on the socket again,
    and the disk guest goes on to its end."""
    from osvmm.errors import ConfigError
    from osvmm.plan.drives import Net, Vsock
    from osvmm.vmm.snapshot import Snapshot, snapshot_drives, snapshot_nets, snapshot_vsock
    from osvmm.vmm.tap import default_mac, open_tap

    tap = f"osnap{os.getpid() % 100000}"
    try:
        open_tap(tap).close()
    except ConfigError as err:
        pytest.skip(f"no tap here: {err}")
    out = []
    part = Partition(
        PartitionConfig(
            Machine.build(16 << 20, 1, virtio_mmio=3),
            image=resolve_image("guests:virtioblk"),
            cmdline="rounds=400",
            drives=(Drive(str(image)),),
            nets=(Net(tap),),
            vsock=Vsock(str(tmp_path / "v.sock"), 7),
            console=out.append,
        )
    ).build()
    part.output = out
    try:
        part.start()
        _wait_text(part, "virtioblk: round 100 ok")
        part.snapshot(str(tmp_path / "snap"), then=lambda: part.stop(0, "snapshot"))
        part.wait(10)
    finally:
        part.close()
    snap = Snapshot.read(str(tmp_path / "snap"))
    assert snapshot_nets(snap.state) == (Net(tap, default_mac(tap)),)
    assert snapshot_vsock(snap.state) == Vsock(str(tmp_path / "v.sock"), 7)
    assert not (tmp_path / "v.sock").exists()  # removed with the first partition
    out2 = []
    back = Partition(
        PartitionConfig(
            snap.machine,
            restore=snap,
            drives=snapshot_drives(snap.state),
            nets=snapshot_nets(snap.state),
            vsock=snapshot_vsock(snap.state),
            console=out2.append,
        )
    ).build()
    try:
        assert back.virtio.devices[1].transport.model.mac == default_mac(tap)
        assert (tmp_path / "v.sock").is_socket()
        back.start()
        result = back.wait(300)
        assert result is not None and result.status == 1, (result, b"".join(out2).decode())
    finally:
        back.close()
        snap.close()
    text = b"".join(out + out2).decode()
    assert _round_lines(text) == list(range(50, 401, 50)) and "rounds 400 done" in text, text


def test_up_snapshots_a_partition_with_a_disk_and_a_plan_restores_it(image, tmp_path):
    """``osvmm snapshot NAME DIR --stop`` against ``osvmm up``, then a plan whose
    ``restore`` has the disk in ``drives``: the guest goes on with every round once."""
    from tests.test_snapshot_cli import guest_text
    from tests.test_supervisor_up import UpProcess

    snap = tmp_path / "snap"
    body = (
        '[[partition]]\nname = "d"\ncpus = "floating"\nmemory = "16M"\n'
        f'image = "guests:virtioblk"\ncmdline = "rounds={ROUNDS}"\ndrives = ["{image}"]\n'
        'restart = "stop"\n'
    )

    def log_until(up, needle: str) -> str:
        path = up.logs / "d.console.log"
        deadline = time.monotonic() + 120
        while needle not in (text := path.read_text() if path.exists() else ""):
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.05)
        return text

    up = UpProcess(body)
    try:
        log_until(up, "virtioblk: round 200 ok")
        r = up.cli("snapshot", "d", str(snap), "--stop")
        assert r.returncode == 0 and r.stdout.endswith(b"; stopped\n"), r.stderr
        first = log_until(up, "[osvmm: ended: ")
    finally:
        up.close()
    up = UpProcess(body + f'restore = "{snap}"\n')
    try:
        second = log_until(up, f"virtioblk: rounds {ROUNDS} done")
        log_until(up, "[osvmm: ended: ")
    finally:
        up.close()
    text = guest_text(first) + guest_text(second)
    assert "FAIL" not in text, text
    assert _round_lines(text) == list(range(50, ROUNDS + 1, 50)), text
    disk = image.read_bytes()
    for sector, block in _final_sectors().items():
        assert disk[sector * 512 : (sector + 1) * 512] == block, sector


def test_a_migration_profile_names_each_disk_with_its_size(image):
    from osvmm.vmm import migration

    part = _disk_partition(image)
    try:
        part.start()
        st = os.stat(image)
        assert migration.profile(part)["devices"] == [
            {
                "kind": "blk",
                "path": str(image),
                "size": 512 * SECTORS,
                "ro": False,
                "file": [st.st_dev, st.st_ino],
            }
        ]
        assert part.wait(120).status == 1  # the guest went on
    finally:
        part.close()


def test_the_device_counters_show_what_the_guest_did(image):
    part = _disk_partition(image)
    try:
        part.start()
        assert part.wait(120).status == 1
        (dev,) = part.device_stats()
    finally:
        part.close()
    counts = dev["counts"]
    assert (counts["read"], counts["write"], counts["flush"], counts["get_id"]) == (3, 1, 1, 1)
    assert counts["errors"] == 1  # the out-of-range read
    assert counts["write_bytes"] == 512 and counts["read_bytes"] == 3 * 512 - 512
    (q,) = dev["queues"]
    assert q["avail_idx"] == q["last_avail"] == q["used_idx"] == 6  # every request answered
    assert 1 <= dev["interrupts"] <= 6 and dev["error"] is None
    assert (dev["base"], dev["irq"]) == (0xC000_0000, 5)


def test_osvmm_stat_shows_a_partitions_devices(image):
    from tests.test_api_openapi import DOC, schema_check
    from tests.test_supervisor_up import UpProcess

    up = UpProcess(
        f'[[partition]]\nname = "disk"\ncpus = "floating"\nmemory = "16M"\n'
        f'image = "guests:virtioblk"\ndrives = ["{image}"]\nrestart = "stop"\n'
    )
    try:
        up.wait_for(lambda p: p["disk"]["state"] == "stopped" and p["disk"]["boots"] == 1)
        r = up.cli("stat", "disk", "--json")
        assert r.returncode == 0, r.stderr
        (stat,) = json.loads(r.stdout)["partitions"]
        schema_check(stat, DOC["components"]["schemas"]["Stat"])
        (dev,) = stat["devices"]
        assert stat["live"] is False and dev["counts"]["write"] == 1
        text = up.cli("stat", "disk").stdout.decode()
        assert re.search(r"device 0 virtio-blk \S+: read 3, write 1, .*; queues q0 6/6/6\n", text)
    finally:
        up.close()
