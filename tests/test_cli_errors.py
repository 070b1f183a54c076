"""Bad input gives one line on stderr and exit status 2, never a traceback.

None of these needs /dev/kvm: osvmm checks its inputs before it takes any
resource, so every test runs with OSVMM_KVM naming a device that does not
exist. The tests mean the same on a host with or without KVM, and one fails
if osvmm opens KVM before it has read and checked what it was given.
"""

from __future__ import annotations

import os
import struct

import pytest

from tests.helpers import run_osvmm


@pytest.fixture(autouse=True)
def no_kvm(monkeypatch):
    monkeypatch.setenv("OSVMM_KVM", "/nonexistent/kvm")


def assert_one_line_error(r, *fragments: str, status: int = 2):
    err = r.stderr.decode()
    assert r.returncode == status, (r.returncode, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("osvmm: error: ")
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_missing_image(tmp_path):
    assert_one_line_error(run_osvmm("run", str(tmp_path / "nope.elf")), "no such file")


def test_empty_image(tmp_path):
    p = tmp_path / "empty.elf"
    p.write_bytes(b"")
    assert_one_line_error(run_osvmm("run", str(p)), "empty")


def test_not_an_elf(tmp_path):
    p = tmp_path / "text.elf"
    p.write_bytes(b"#!/bin/sh\necho hi\n" * 10)
    assert_one_line_error(run_osvmm("run", str(p)), str(p))


def test_truncated_elf(tmp_path):
    from osvmm.guests.build import guest_path

    data = guest_path("hello").read_bytes()
    p = tmp_path / "trunc.elf"
    p.write_bytes(data[:40])
    assert_one_line_error(run_osvmm("run", str(p)), "trunc.elf")


def test_image_larger_than_memory(tmp_path):
    # An ELF64 PVH-less image whose one segment needs 8 MiB at 1 MiB.
    ehdr = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF",
        2,
        1,
        1,
        0,
        0,
        b"\0" * 7,
        2,
        62,
        1,
        0x100000,
        64,
        0,
        0,
        64,
        56,
        1,
        64,
        0,
        0,
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, 0x100000, 0x100000, 16, 8 << 20, 0x1000)
    data = ehdr + phdr
    data += b"\0" * (0x1000 - len(data)) + b"\xf4" * 16
    p = tmp_path / "big.elf"
    p.write_bytes(data)
    assert_one_line_error(run_osvmm("run", str(p), "--memory", "4M"), "MiB")


@pytest.mark.parametrize("value", ["0", "-1", "12X", "64Q", "1.5K", "abc", ""])
def test_bad_memory_value(value):
    assert_one_line_error(run_osvmm("run", "guests:hello", "--memory", value), "--memory")


def test_memory_too_small():
    assert_one_line_error(run_osvmm("run", "guests:hello", "--memory", "1M"), "--memory")


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_cpus_value(value):
    assert_one_line_error(run_osvmm("run", "guests:hello", "--cpus", value), "--cpus")


def test_unknown_bundled_guest():
    assert_one_line_error(run_osvmm("run", "guests:nosuch"), "no bundled guest")


def test_nothing_to_boot():
    assert_one_line_error(run_osvmm("run"), "nothing to boot")


def test_unknown_option_is_a_usage_error():
    assert_one_line_error(run_osvmm("run", "guests:hello", "--frobnicate"), "unrecognized")


def test_kvm_device_missing():
    assert_one_line_error(run_osvmm("run", "guests:hello"), "does not exist")
    assert_one_line_error(run_osvmm("caps"), "does not exist")


def test_kvm_device_not_permitted(monkeypatch):
    from osvmm.errors import KvmUnavailable
    from osvmm.kvm import system

    def deny(path, flags):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(system.os, "open", deny)
    with pytest.raises(KvmUnavailable, match="permission denied"):
        system.Kvm()


def test_no_traceback_for_directories(tmp_path):
    assert_one_line_error(run_osvmm("run", str(tmp_path)), "directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_image(tmp_path):
    p = tmp_path / "secret.elf"
    p.write_bytes(b"\x7fELF")
    p.chmod(0)
    assert_one_line_error(run_osvmm("run", str(p)), "permission denied")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--memory", "18446744073709551616"], "over the 8 TiB a partition may have"),
        (["--memory", "99999999999999999999999T"], "over the 8 TiB"),
        (["--cpus", "99999999999999999999"], "--cpus 99999999999999999999: a partition has at"),
        (["--cpus", "256"], "--cpus 256: a partition has at most 254 vCPUs"),
        (["--numa", "100000", "--memory", "1T"], "100000 NUMA nodes: a partition has at most 64"),
    ],
)
def test_huge_numbers_are_input_errors_not_internal_ones(args, fragment):
    assert_one_line_error(run_osvmm("run", "guests:hello", *args), fragment)
