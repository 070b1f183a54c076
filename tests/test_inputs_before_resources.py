"""Inputs before resources: a bad image, initrd, command line or plan is reported
before /dev/kvm is opened or any guest memory is mapped. With KVM pointed at a
path that does not exist, the user sees the input's error (exit 2), not "no KVM";
only a run whose inputs are all good gets as far as KVM."""

from __future__ import annotations

import pytest

from tests.helpers import run_osvmm
from tests.test_cli_errors import assert_one_line_error


@pytest.fixture(autouse=True)
def no_kvm(monkeypatch):
    monkeypatch.setenv("OSVMM_KVM", "/nonexistent/kvm")


def test_missing_image_is_reported_not_kvm(tmp_path):
    assert_one_line_error(run_osvmm("run", str(tmp_path / "nope.elf")), "no such file")


def test_corrupt_image_is_reported_not_kvm(tmp_path):
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + b"\x02\x01\x01" + bytes(57))  # an ELF64 header of zeros
    r = run_osvmm("run", str(bad))
    assert_one_line_error(r, str(bad))
    assert "kvm" not in r.stderr.decode().lower()


def test_missing_initrd_is_reported_not_kvm(tmp_path):
    from osvmm.guests.build import guest_path

    # A PVH guest is not Linux: --initrd is refused as a usage error, before KVM.
    r = run_osvmm("run", str(guest_path("hello")), "--initrd", str(tmp_path / "nope"))
    assert_one_line_error(r, "--initrd needs a Linux kernel")


def test_bad_command_line_is_reported_not_kvm():
    r = run_osvmm("run", "guests:hello", "--append", 'a"b"=1')
    assert_one_line_error(r, "--append", "bad key")


def test_bad_machine_is_reported_not_kvm():
    r = run_osvmm("run", "guests:hello", "--memory", "2M", "--numa", "4")
    assert_one_line_error(r, "cannot be split into 4 NUMA nodes")


def test_good_inputs_then_reach_kvm():
    assert_one_line_error(run_osvmm("run", "guests:hello"), "/nonexistent/kvm does not exist")


def test_up_checks_every_image_before_anything_starts(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[vmm]\ncontrol_socket = "{tmp_path}/s"\nlog_dir = "{tmp_path}/logs"\n'
        '[[partition]]\nname = "a"\ncpus = "floating"\nmemory = "8M"\nimage = "guests:hello"\n'
        '[[partition]]\nname = "b"\ncpus = "floating"\nmemory = "8M"\n'
        f'image = "{tmp_path}/broken.elf"\n'
    )
    (tmp_path / "broken.elf").write_bytes(b"not an elf at all" * 8)
    r = run_osvmm("up", str(plan), timeout=60)
    assert_one_line_error(r, "partition 'b'", "broken.elf")
    assert not (tmp_path / "logs").exists()  # nothing started, not even the logs
