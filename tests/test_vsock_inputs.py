"""A bad vsock, on the command line and in a plan: one line, exit 2, nothing
started (before /dev/kvm is opened: OSVMM_KVM points nowhere, and the vsock's
error is what the user sees)."""

from __future__ import annotations

import socket

import pytest

from osvmm.errors import ConfigError
from osvmm.plan.config import parse_plan
from osvmm.plan.drives import Vsock, parse_vsock
from tests.helpers import run_osvmm
from tests.test_cli_errors import assert_one_line_error


@pytest.fixture(autouse=True)
def no_kvm(monkeypatch):
    monkeypatch.setenv("OSVMM_KVM", "/nonexistent/kvm")


def test_parse_vsock():
    assert parse_vsock("uds=/run/v.sock") == Vsock("/run/v.sock", 3)
    assert parse_vsock("uds=v.sock,cid=42") == Vsock("v.sock", 42)
    assert parse_vsock("cid=4294967294,uds=v") == Vsock("v", 4294967294)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("v.sock", "unknown option 'v.sock'"),
        ("cid=3", "give uds=PATH"),
        ("uds=", "an empty path"),
        ("uds=v,cid=x", "cid 'x' is not a whole number"),
        ("uds=v,cid=", "cid '' is not a whole number"),
        ("uds=v,cid=2", "cid 2 is not 3 to 4294967294"),
        ("uds=v,cid=-3", "cid -3 is not 3"),
        ("uds=v,cid=4294967295", "4294967295 is VMADDR_CID_ANY"),
        ("uds=v,cid=4294967296", "cid 4294967296 is not"),
        ("uds=v,ro", "unknown option 'ro'"),
        ("uds=/" + "x" * 100, "longer than 96 bytes"),
    ],
)
def test_bad_vsock_text(text, why):
    with pytest.raises(ConfigError, match=why) as err:
        parse_vsock(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ('"uds=v,cid=1"', "cid 1 is not 3"),
        ('{ uds = "v", cid = 2 }', "cid 2 is not 3"),
        ('{ uds = "v", cid = "4" }', "cid '4' is not a whole number"),
        ('{ uds = "v", cid = true }', "cid True is not a whole number"),
        ("{ cid = 4 }", "uds: expected a path string"),
        ('{ uds = "v", port = 4 }', "unknown key 'port'"),
        ("3", 'expected "uds=PATH'),
        ('["uds=v"]', 'expected "uds=PATH'),
    ],
)
def test_bad_plan_vsock(tmp_path, value, why):
    with pytest.raises(ConfigError, match=why) as err:
        parse_plan(plan_text(tmp_path, value), tmp_path)
    assert "\n" not in str(err.value) and "partition 'p0': vsock" in str(err.value)


def plan_text(tmp_path, *values, extra=""):
    parts = [
        f'[[partition]]\nname = "p{i}"\ncpus = "floating"\nmemory = "8M"\n'
        f'image = "guests:hello"\nvsock = {value}\n{extra}'
        for i, value in enumerate(values)
    ]
    return f'[vmm]\ncontrol_socket = "{tmp_path}/s"\nlog_dir = "{tmp_path}/logs"\n' + "".join(parts)


def test_plan_vsock_forms(tmp_path):
    plan = parse_plan(plan_text(tmp_path, '"uds=a.sock"', '{ uds = "/abs/b.sock", cid = 9 }'), "/p")
    assert [p.vsock for p in plan.partitions] == [Vsock("/p/a.sock", 3), Vsock("/abs/b.sock", 9)]


def test_plan_partitions_do_not_share_a_socket(tmp_path):
    with pytest.raises(ConfigError, match="the vsock socket of partition 'p0' already"):
        parse_plan(plan_text(tmp_path, '"uds=a.sock"', '{ uds = "a.sock", cid = 4 }'), tmp_path)


def test_plan_vsock_with_restore(tmp_path):
    # The snapshot's vsock (its CID) is checked against it when osvmm up reads the
    # snapshot (docs/snapshots.md); the plan itself takes both.
    text = plan_text(tmp_path, '"uds=a.sock"', extra='restore = "snap"\n')
    plan = parse_plan(text, tmp_path)
    assert plan.partitions[0].restore == str(tmp_path / "snap")


def test_plan_counts_the_vsock_among_the_devices(tmp_path):
    drives = str([f"d{i}.img" for i in range(7)]).replace("'", '"')
    text = plan_text(tmp_path, '"uds=a.sock"', extra=f"drives = {drives}\n")
    with pytest.raises(ConfigError, match="7 disks, 0 tap NICs, 0 network NICs and 1 vsock"):
        parse_plan(text, tmp_path)


# -- osvmm run --------------------------------------------------------------------------


def test_run_refuses_bad_vsock_text_before_kvm():
    r = run_osvmm("run", "guests:hello", "--vsock", "uds=v,cid=2")
    assert_one_line_error(r, "--vsock uds=v,cid=2: cid 2 is not 3 to 4294967294")


def test_run_takes_one_vsock():
    r = run_osvmm("run", "guests:hello", "--vsock", "uds=a", "--vsock", "uds=b")
    assert_one_line_error(r, "--vsock: given 2 times, a partition has one")


def test_run_refuses_a_socket_path_someone_listens_on(tmp_path):
    path = tmp_path / "v.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        r = run_osvmm("run", "guests:hello", "--vsock", f"uds={path}")
        assert_one_line_error(r, f"--vsock uds={path}: another process listens there")
    finally:
        live.close()
    assert path.is_socket()  # left alone


def test_run_refuses_a_path_that_is_no_socket(tmp_path):
    path = tmp_path / "v.sock"
    path.write_text("not mine to remove")
    r = run_osvmm("run", "guests:hello", "--vsock", f"uds={path}")
    assert_one_line_error(r, "exists and is not a socket")
    assert path.read_text() == "not mine to remove"


def test_run_with_a_vsock_leaves_no_socket_behind_when_kvm_is_missing(tmp_path):
    path = tmp_path / "v.sock"
    r = run_osvmm("run", "guests:hello", "--vsock", f"uds={path}")
    assert r.returncode != 0 and "Traceback" not in r.stderr.decode()
    assert not path.exists()


def test_run_vsock_counts_among_the_devices(tmp_path):
    args = []
    for i in range(7):
        (tmp_path / f"d{i}.img").write_bytes(bytes(512))
        args += ["--drive", str(tmp_path / f"d{i}.img")]
    r = run_osvmm("run", "guests:hello", *args, "--vsock", "uds=v")
    assert_one_line_error(r, "7 disks, 0 NICs and 1 vsock", "at most 7 devices")


def test_restore_takes_a_vsock_in_place_of_the_snapshots(tmp_path):
    # The snapshot is read first (docs/snapshots.md); a plain --restore takes the
    # snapshot's vsock, --vsock another socket with the same CID.
    r = run_osvmm("run", "--restore", str(tmp_path), "--vsock", "uds=v")
    err = r.stderr.decode()
    assert r.returncode == 2 and f"{tmp_path}: not a snapshot (no state file)" in err, err


def test_up_checks_the_vsock_path_before_anything_starts(tmp_path):
    (tmp_path / "taken").write_text("a file")
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text(tmp_path, '"uds=ok.sock"', '{ uds = "taken" }'))
    r = run_osvmm("up", str(plan), timeout=60)
    assert_one_line_error(r, "partition 'p1'", "vsock uds=", "exists and is not a socket")
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ok.sock").exists()
