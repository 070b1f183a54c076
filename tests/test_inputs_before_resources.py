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


def test_up_refuses_an_image_that_exists_but_does_not_load(tmp_path):
    """docs/partitions.md: nothing starts unless every image loads, not merely exists:
    a valid ELF whose segment needs more memory than its partition has stops up."""
    from tests.test_loader_elf import elf

    big = elf(segments=[{"paddr": 0x100000, "data": b"\xf4" * 16, "memsz": 16 << 20}])
    (tmp_path / "big.elf").write_bytes(big)
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[vmm]\ncontrol_socket = "{tmp_path}/s"\nlog_dir = "{tmp_path}/logs"\n'
        '[[partition]]\nname = "a"\ncpus = "floating"\nmemory = "8M"\nimage = "guests:hello"\n'
        '[[partition]]\nname = "b"\ncpus = "floating"\nmemory = "8M"\n'
        f'image = "{tmp_path}/big.elf"\n'
    )
    r = run_osvmm("up", str(plan), timeout=60)
    assert_one_line_error(r, "partition 'b'", "big.elf", "needs 17 MiB of guest memory")
    assert not (tmp_path / "logs").exists()


def test_check_boot_prepares_every_kernel_and_initrd(tmp_path):
    """check_boot reads each kernel and initrd and places the initrd: an initrd larger
    than the partition's memory fails there, naming the partition, before any start."""
    from osvmm.errors import ConfigError
    from osvmm.plan.config import parse_plan
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology
    from osvmm.up.partition_config import check_boot
    from tests.test_loader_bzimage import VMLINUX

    (tmp_path / "vmlinux").write_bytes(VMLINUX)
    (tmp_path / "initrd").write_bytes(b"\0" * (40 << 20))
    part = '[[partition]]\nname = "{n}"\ncpus = "floating"\nmemory = "{m}"\nkernel = "vmlinux"\n'
    text = part.format(n="ok", m="64M") + part.format(n="small", m="32M") + 'initrd = "initrd"\n'
    topo = read_topology("tests/fixtures/sysfs/small-2cpu")
    with pytest.raises(ConfigError, match=r"partition 'small': initrd of 40\.0 MiB does not fit"):
        check_boot(place(parse_plan(text, tmp_path), topo))
    fine = part.format(n="ok", m="64M") + part.format(n="big", m="64M") + 'initrd = "initrd"\n'
    assert set(check_boot(place(parse_plan(fine, tmp_path), topo))) == {"ok", "big"}
