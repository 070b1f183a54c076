"""Inside the hardware-virtualization rig: /dev/kvm is AMD SVM with nested paging,
and osvmm boots its hello guest on it (scripts/hwvirt-rig, docs/testing.md)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import run_osvmm

pytestmark = pytest.mark.rig


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name.strip() == "flags":
                return set(value.split())
    return set()


def test_cpu_offers_svm_with_nested_paging():
    assert {"svm", "npt"} <= cpu_flags()


def test_dev_kvm_is_kvm_amd():
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    os.close(fd)
    assert os.path.isdir("/sys/module/kvm_amd")
    assert not os.path.isdir("/sys/module/kvm_pvm")


def test_l1_holds_a_vm_so_kvm_does_not_patch_its_text_at_each_boot():
    """scripts/rig/kvm-hold (docs/testing.md, "Known"): a process of L1 holds /dev/kvm
    and a vCPU ("anon_inode:kvm-vcpu:0") for the whole run."""
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"kvm-hold" not in f.read():
                    continue
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue  # a process that ended meanwhile
        holders.append(links)
    assert any("anon_inode:kvm-vcpu:0" in links for links in holders), holders


def test_hello_guest_runs():
    r = run_osvmm("run", "guests:hello", timeout=600)
    assert r.stdout == b"Hello from osvmm guest\n"
    assert r.returncode == 1  # debug-exit value 0 -> (0 << 1) | 1
    assert r.stderr == b""


def test_a_triple_fault_says_kvm_on_amd_lost_its_registers():
    # kvm_amd INITs a vCPU at a shutdown before KVM_RUN returns (the VMCB is undefined
    # after one): the registers osvmm reads are the reset state, rip 0xfff0.
    r = run_osvmm("run", "guests:triplefault", timeout=600)
    assert r.returncode == 4
    assert r.stderr.decode().splitlines()[-1] == (
        "osvmm: guest fault on vcpu 0 at rip 0xfff0: triple fault (shutdown; KVM reset "
        "the vCPU before reporting it, as it does on AMD: the registers at the fault are lost)"
    )
