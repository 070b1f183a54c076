"""vmm/device_handover.py without KVM: the destination's check of the devices a
migration brings (one line per refusal), a migration's release of a disk image
and a vsock socket and their taking back, and a takeover's adoption of handed
descriptors (the plan's own files only, every descriptor closed on a refusal)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from osvmm.errors import ConfigError, SnapshotError
from osvmm.plan.drives import Drive, Vsock
from osvmm.vmm import device_handover as dh
from osvmm.vmm.blockfile import open_drive
from osvmm.vmm.vsock_uds import open_vsock_uds
from tests import test_virtio_net_guest
from tests.helpers import listening, locked


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    return path


DISK = {"kind": "blk", "path": "/src/disk.img", "size": 4096, "ro": False}
VSOCK = {"kind": "vsock", "uds": "/src/v.sock", "cid": 5}


def test_a_destination_with_the_same_devices_accepts(image):
    dh.check_profile([DISK, VSOCK], [Drive(str(image))], (), Vsock("/x.sock", 5), "here")


def test_a_takeover_needs_the_very_files_and_socket_path(image, tmp_path):
    st = os.stat(image)
    disk = DISK | {"path": str(image), "file": [st.st_dev, st.st_ino]}
    vsock = VSOCK | {"uds": "/v.sock"}
    dh.check_profile([disk, vsock], [Drive(str(image))], (), Vsock("/v.sock", 5), "here", True)
    copy = tmp_path / "copy.img"
    copy.write_bytes(image.read_bytes())
    with pytest.raises(SnapshotError) as err:
        dh.check_profile([disk], [Drive(str(copy))], (), None, "here", takeover=True)
    assert str(err.value) == f"here: disk 0 {copy} is not the running partition's ({image})"
    dh.check_profile([disk], [Drive(str(copy))], (), None, "here")  # a migration's: a copy
    with pytest.raises(SnapshotError) as err:
        dh.check_profile([vsock], [], (), Vsock("/w.sock", 5), "here", takeover=True)
    assert str(err.value) == "here: vsock /w.sock, the running partition's listens at /v.sock"


@pytest.mark.parametrize(
    "devices,drives,vsock,message",
    [
        ([DISK], "big", None, "here: disk 0 {big} has 8192 bytes, the migrated one "
         "(/src/disk.img) 4096: it needs the same disk"),
        ([DISK], "ro", None, "here: disk 0 {image}: the migrated one is writable"),
        ([DISK], "", None, "here has 0 disks, the migrated one 1"),
        ([DISK], "missing", None, "here: disk 0 {missing}: No such file or directory"),
        ([VSOCK], "", None, "here has no vsock, the migrated one has one"),
        ([VSOCK], "", Vsock("/x", 6), "here: vsock cid 6, the migrated one's is 5"),
        ([{"kind": "net", "tap": "t0", "mac": "02:00:00:00:00:01"}], "", None,
         "here has 0 tap NICs, the migrated one 1"),
    ],
)  # fmt: skip
def test_a_destination_that_cannot_take_the_devices_refuses_in_one_line(
    image, tmp_path, devices, drives, vsock, message
):
    big = tmp_path / "big.img"
    big.write_bytes(bytes(8192))
    missing = tmp_path / "missing.img"
    given = {
        "big": [Drive(str(big))],
        "ro": [Drive(str(image), True)],
        "": [],
        "missing": [Drive(str(missing))],
    }[drives]
    with pytest.raises(SnapshotError) as err:
        dh.check_profile(devices, given, (), vsock, "here")
    assert str(err.value) == message.format(big=big, image=image, missing=missing)


def test_a_migration_releases_the_image_and_socket_and_takes_them_back(image, tmp_path):
    disk = open_drive(str(image), False)
    uds = tmp_path / "v.sock"
    vsock = open_vsock_uds(str(uds))
    part = SimpleNamespace(virtio=SimpleNamespace(backends=[disk, vsock]))
    try:
        assert locked(image) and listening(uds)
        released = dh.release(part)
        assert not locked(image) and not uds.exists()  # a destination may open them
        other = open_drive(str(image), False)  # as a destination on this host does
        assert released.reacquire(0.2) == [f"{image}: not locked again (held elsewhere)"]
        other.close()
        assert released.reacquire() == []
        assert locked(image) and listening(uds)
        # Once handed off, the socket file is the other VMM's: left where it is.
        dh.hand_off(SimpleNamespace(virtio=SimpleNamespace(backends=[vsock], handed_off=False)))
        vsock.close()
        assert uds.exists()
    finally:
        disk.close()
        vsock.close()


def test_a_takeover_adopts_the_plans_own_files_only(image, tmp_path):
    disk = open_drive(str(image), False)
    uds = tmp_path / "v.sock"
    vsock = open_vsock_uds(str(uds))
    config = SimpleNamespace(drives=(Drive(str(image)),), nets=(), vsock=Vsock(str(uds), 3))
    try:
        handed = [("blk", os.dup(disk.fd)), ("vsock", os.dup(vsock.listener.fileno()))]
        disks, taps, adopted = dh.adopt(handed, config, "partition 'd'")
        assert [d.size for d in disks] == [4096] and taps == [] and adopted.path == str(uds)
        for backend in (*disks, adopted):
            backend.close()  # a failed takeover: the old VMM's lock and socket file stay
        assert locked(image) and uds.exists()

        other = tmp_path / "other.img"
        other.write_bytes(bytes(4096))
        fd = os.open(other, os.O_RDWR)
        wrong = [("blk", fd), ("vsock", os.dup(vsock.listener.fileno()))]
        with pytest.raises(ConfigError, match=f"drive {image}: not the running partition's"):
            dh.adopt(wrong, config, "partition 'd'")
        for _, n in wrong:  # every one closed
            with pytest.raises(OSError):
                os.fstat(n)
        with pytest.raises(ConfigError, match=r"handed over are \['vsock'\], the plan's"):
            dh.adopt([("vsock", os.dup(vsock.listener.fileno()))], config, "partition 'd'")
    finally:
        disk.close()
        vsock.close()


netns = test_virtio_net_guest.netns  # the fixture: a namespace with a persistent tap

TAP_CODE = """
import os
from types import SimpleNamespace
from osvmm.errors import ConfigError
from osvmm.vmm import device_handover as dh
from osvmm.vmm.tap import open_tap

def attach():
    try:
        open_tap(TAP).close()
        return "free"
    except ConfigError as err:
        return "busy" if "in use by another process" in str(err) else str(err)

tap = open_tap(TAP)
print(attach())
released = dh.release(SimpleNamespace(virtio=SimpleNamespace(backends=[tap])))
print(attach())
print(released.reacquire())
print(attach())
config = SimpleNamespace(drives=(), nets=(SimpleNamespace(tap=TAP),), vsock=None)
_, (adopted,), _ = dh.adopt([("net", os.dup(tap.fd))], config, "p")
tap.close()
print(adopted.name, attach())
"""


def test_a_migration_releases_its_tap_and_takes_it_back_and_a_takeover_adopts_it(netns):
    """In a network namespace (tests/test_virtio_net_guest.py's): the tap attached
    is busy for another process; released, it is free; taken back, busy again; its
    descriptor adopted (a takeover), it stays attached when the first one closes."""
    import subprocess
    import sys

    from tests.helpers import REPO

    TAP = test_virtio_net_guest.TAP  # noqa: N806 - its name there
    r = subprocess.run(
        [*netns, sys.executable, "-c", f"TAP = {TAP!r}\n" + TAP_CODE],
        capture_output=True,
        cwd=str(REPO),
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().splitlines() == ["busy", "free", "[]", "busy", f"{TAP} busy"]
