"""Bad disks, on the command line and in a plan: one line, exit 2, nothing started
(before /dev/kvm is opened: OSVMM_KVM points nowhere, and the disk's error is
what the user sees)."""

from __future__ import annotations

import pytest

from osvmm.errors import ConfigError
from osvmm.plan.config import parse_plan
from osvmm.plan.drives import Drive, parse_drive
from tests.helpers import run_osvmm
from tests.test_cli_errors import assert_one_line_error


@pytest.fixture(autouse=True)
def no_kvm(monkeypatch):
    monkeypatch.setenv("OSVMM_KVM", "/nonexistent/kvm")


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    return path


def test_parse_drive():
    assert parse_drive("a.img") == Drive("a.img", False)
    assert parse_drive("a.img,ro") == Drive("a.img", True)
    assert parse_drive("a.img,ro,rw") == Drive("a.img", False)
    for text, why in (
        (",ro", "no image file"),
        ("a.img,foo", "unknown option 'foo'"),
        ("a.img,", "unknown option ''"),
    ):
        with pytest.raises(ConfigError, match=why):
            parse_drive(text)


@pytest.mark.parametrize(
    ("make", "drive", "fragment"),
    [
        (None, "{tmp}/missing.img", "no such file"),
        (None, "{tmp}", "is a directory"),
        ("odd", "{tmp}/odd.img", "is not a whole number of 512-byte sectors"),
        ("empty", "{tmp}/empty.img", "the image is empty"),
        (None, "/dev/null", "not a regular file"),
        ("disk", "{tmp}/disk.img,foo", "unknown option 'foo'"),
        ("disk", "{tmp}/disk.img,ro,", "unknown option ''"),
    ],
)
def test_run_refuses_a_bad_drive_before_kvm(tmp_path, make, drive, fragment):
    if make == "odd":
        (tmp_path / "odd.img").write_bytes(bytes(1000))
    elif make == "empty":
        (tmp_path / "empty.img").write_bytes(b"")
    elif make == "disk":
        (tmp_path / "disk.img").write_bytes(bytes(4096))
    r = run_osvmm("run", "guests:hello", "--drive", drive.format(tmp=tmp_path))
    assert_one_line_error(r, "--drive", fragment)
    assert "kvm" not in r.stderr.decode().lower()


def test_run_refuses_the_same_image_twice(disk):
    r = run_osvmm("run", "guests:hello", "--drive", str(disk), "--drive", f"{disk},ro")
    assert_one_line_error(r, "in use by another VM")


def test_run_refuses_more_drives_than_slots(tmp_path):
    drives = []
    for i in range(8):
        (tmp_path / f"d{i}.img").write_bytes(bytes(512))
        drives += ["--drive", str(tmp_path / f"d{i}.img")]
    assert_one_line_error(run_osvmm("run", "guests:hello", *drives), "8 disks", "at most 7")


def test_run_with_good_drives_gets_to_kvm(disk, tmp_path):
    (tmp_path / "ro.img").write_bytes(bytes(512))
    r = run_osvmm("run", "guests:hello", "--drive", str(disk), "--drive", f"{tmp_path}/ro.img,ro")
    assert_one_line_error(r, "/nonexistent/kvm does not exist")


def test_restore_takes_drives_nets_and_a_vsock(disk, tmp_path):
    # --drive, --net and --vsock name the snapshot's disks, taps and socket anew
    # (docs/snapshots.md): the snapshot is read first.
    for option, value in (
        ("--drive", str(disk)),
        ("--net", "tap=t0"),
        ("--vsock", f"uds={tmp_path}/v"),
    ):
        r = run_osvmm("run", "--restore", str(tmp_path), option, value)
        assert_one_line_error(r, f"{tmp_path}: not a snapshot (no state file)")


# -- plans -------------------------------------------------------------------------------


def plan_text(tmp_path, *drive_lists):
    parts = []
    for i, drives in enumerate(drive_lists):
        parts.append(
            f'[[partition]]\nname = "p{i}"\ncpus = "floating"\nmemory = "8M"\n'
            f'image = "guests:hello"\ndrives = {drives}\n'
        )
    return f'[vmm]\ncontrol_socket = "{tmp_path}/s"\nlog_dir = "{tmp_path}/logs"\n' + "".join(parts)


def test_plan_drives_are_parsed_relative_to_the_plan(tmp_path):
    plan = parse_plan(plan_text(tmp_path, '["a.img", "/abs/b.img,ro"]'), tmp_path)
    assert plan.partitions[0].drives == (
        Drive(str(tmp_path / "a.img"), False),
        Drive("/abs/b.img", True),
    )


@pytest.mark.parametrize(
    ("lists", "why"),
    [
        (('"a.img"',), "drives: expected"),
        (("[1]",), r'a list of "FILE\[,ro\]" strings'),
        (('["a.img,xx"]',), "unknown option 'xx'"),
        (('["a.img", "a.img,ro"]',), "listed twice"),
        (('["a.img"]', '["a.img,ro"]'), "shared only read-only"),
        (('["a.img,ro"]', '["a.img"]'), "shared only read-only"),
        ((str([f"d{i}.img" for i in range(8)]).replace("'", '"'),), "8 disks, at most 7"),
    ],
)
def test_bad_plan_drives(tmp_path, lists, why):
    with pytest.raises(ConfigError, match=why) as err:
        parse_plan(plan_text(tmp_path, *lists), tmp_path)
    assert "\n" not in str(err.value)


def test_a_shared_read_only_image_is_fine(tmp_path):
    plan = parse_plan(plan_text(tmp_path, '["a.img,ro"]', '["a.img,ro"]'), tmp_path)
    assert [p.drives[0].readonly for p in plan.partitions] == [True, True]


def test_up_checks_every_disk_before_anything_starts(tmp_path, disk):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text(tmp_path, f'["{disk}"]', f'["{tmp_path}/missing.img"]'))
    r = run_osvmm("up", str(plan), timeout=60)
    assert_one_line_error(r, "partition 'p1'", "missing.img: no such file")
    assert not (tmp_path / "logs").exists()  # nothing started, not even the logs


# -- NICs ----------------------------------------------------------------------------------


def test_parse_net():
    from osvmm.plan.drives import Net, parse_net

    assert parse_net("tap=t0") == Net("t0", None)
    assert parse_net("tap=t0,mac=02:00:00:00:00:01") == Net("t0", bytes([2, 0, 0, 0, 0, 1]))
    cases = {
        "t0": "give tap=NAME",
        "mac=02:00:00:00:00:01": "give tap=NAME",
        "tap=t0,x=1": "unknown option 'x=1'",
        "tap=t0,mac=zz": "is not six hex bytes",
        "tap=t0,mac=02:00:00:00:00": "is not six hex bytes",
        "tap=t0,mac=01:00:00:00:00:01": "multicast",
    }
    for text, why in cases.items():
        with pytest.raises(ConfigError, match=why):
            parse_net(text)


@pytest.mark.parametrize(
    ("net", "fragment"),
    [
        ("tap=t0,foo", "unknown option 'foo'"),
        ("tap=" + "x" * 16, "not an interface name"),
        ("tap=a/b", "not an interface name"),
        ("tap=lo", "cannot attach"),  # an interface that is no tap (or no permission)
    ],
)
def test_run_refuses_a_bad_nic_before_kvm(net, fragment):
    r = run_osvmm("run", "guests:hello", "--net", net)
    assert_one_line_error(r, "--net", fragment)
    assert "kvm" not in r.stderr.decode().lower()


def test_disks_and_nics_share_the_slots(tmp_path):
    args = []
    for i in range(5):
        (tmp_path / f"d{i}.img").write_bytes(bytes(512))
        args += ["--drive", str(tmp_path / f"d{i}.img")]
    args += ["--net", "tap=t0", "--net", "tap=t1", "--net", "tap=t2"]
    r = run_osvmm("run", "guests:hello", *args)
    assert_one_line_error(r, "5 disks, 3 NICs and 0 vsock", "at most 7 devices")
