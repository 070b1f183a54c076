"""Enforcement checked from /proc, not from the VMM's bookkeeping: vCPU thread
affinity (Cpus_allowed_list), the memory policy (numa_maps bind:N), huge-page
advice and locking (smaps VmFlags hg/lo, Locked; status VmLck)."""

from __future__ import annotations

import mmap
import os

import pytest

from osvmm.errors import ConfigError, KvmError
from osvmm.vmm import enforce
from tests.test_supervisor_up import UpProcess

# Dedicated CPU 1 for 'pinned' (prefaulted and locked), the pool (CPU 0) for
# 'floating' (4K pages): what a 2-CPU, 1-node host can hold.
PLAN = """
[[partition]]
name = "pinned"
cpus = "1"
memory = "8M"
image = "guests:counter"
prefault = true
hugepages = true

[[partition]]
name = "floating"
cpus = "floating"
memory = "4M"
image = "guests:counter"
hugepages = false
"""


def proc_threads(pid: int) -> dict[str, int]:
    """comm -> tid of every thread of ``pid``, read from /proc (a short-lived thread,
    such as a control connection's, may end between the listing and the read)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out[f.read().strip()] = int(tid)
        except FileNotFoundError:
            continue
    return out


def status_field(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(key)


@pytest.fixture(scope="module")
def up():
    if os.cpu_count() < 2:
        pytest.skip("needs 2 CPUs: one dedicated, one for the pool")
    vmm = UpProcess(PLAN)
    try:  # a VMM that never got its partitions running is ended all the same
        vmm.wait_for(lambda p: all(x["state"] == "running" for x in p.values()))
        yield vmm
    finally:
        vmm.close()


@pytest.mark.kvm
def test_vcpu_threads_are_pinned(up):
    pid = up.proc.pid
    threads = proc_threads(pid)
    assert enforce.thread_affinity(pid, threads["pinned/0"]) == [1]
    assert enforce.thread_affinity(pid, threads["floating/0"]) == [0]
    # The VMM's own threads stay on the pool, off the dedicated core.
    assert enforce.thread_affinity(pid, pid) == [0]
    # The tids the control socket reports are the same threads.
    parts = up.ps()
    assert parts["pinned"]["tids"] == [threads["pinned/0"]]


@pytest.mark.kvm
def test_guest_memory_policy_huge_pages_and_lock(up):
    pid = up.proc.pid
    parts = up.ps()
    (addr,) = parts["pinned"]["memory_host_addrs"]
    pinned = enforce.mapping_flags(pid, addr)
    assert pinned["policy"] == "bind:0"
    assert "hg" in pinned["vmflags"] and "lo" in pinned["vmflags"]
    assert pinned["locked_kb"] == 8 << 10 and pinned["rss_kb"] == 8 << 10
    assert int(status_field(pid, "VmLck").split()[0]) >= 8 << 10
    (addr,) = parts["floating"]["memory_host_addrs"]
    floating = enforce.mapping_flags(pid, addr)
    assert floating["policy"] == "bind:0"
    assert "hg" not in floating["vmflags"] and "lo" not in floating["vmflags"]
    assert floating["rss_kb"] < 4 << 10  # not prefaulted: only what the guest touched


@pytest.mark.kvm
def test_enforcement_notes_name_what_was_applied(up):
    parts = up.ps()
    assert "HLT and PAUSE exits disabled" in parts["pinned"]["enforcement"]
    assert not any("exits" in n for n in parts["floating"]["enforcement"])


def test_bind_memory_is_seen_in_numa_maps():
    mem = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = enforce.ctypes.addressof(enforce.ctypes.c_char.from_buffer(mem))
    before = enforce.mapping_flags(os.getpid(), addr)
    assert before["policy"] == "default"
    assert enforce.bind_memory(addr, len(mem), 0) == "memory bound to node 0"
    assert enforce.mapping_flags(os.getpid(), addr)["policy"] == "bind:0"
    with pytest.raises(ConfigError, match="NUMA node 63 cannot hold memory"):
        enforce.bind_memory(addr, len(mem), 63)


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert enforce.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert enforce.thp_mode(str(f)) == "always"
    assert enforce.thp_mode(str(tmp_path / "absent")) == "never"
    mem = mmap.mmap(-1, 2 << 20)
    assert enforce.advise_huge(mem, "never").startswith("4K pages")


def test_thread_name_fits_comm():
    assert enforce.thread_name("web", 3) == "web/3"
    name = enforce.thread_name("a-very-long-partition-name", 12)
    assert name == "a-very-long-/12" and len(name) == 15


@pytest.mark.kvm
def test_disable_exits_only_before_vcpus_exist():
    from osvmm.kvm import Kvm

    with_kvm = Kvm()
    try:
        vm = with_kvm.create_vm()
        assert enforce.disable_exits(vm) == "HLT and PAUSE exits disabled"
        vm.close()
        vm = with_kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        with pytest.raises(KvmError, match="EINVAL"):
            enforce.disable_exits(vm)
        vcpu.close()
        vm.close()
    finally:
        with_kvm.close()
