"""Snapshots of running partitions and their restore, with the bundled guests (needs
/dev/kvm): the counter goes on without a gap or a repeat, memory is the same at
pause and at resume, every vCPU of an SMP guest goes on and both timers keep
firing, and a host that cannot run a snapshot refuses it in one line."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import struct
import threading
import time

import pytest

from osvmm.errors import KvmError, SnapshotError
from osvmm.guests.build import guest_path
from osvmm.machine import Machine
from osvmm.snapshot import format as fmt
from osvmm.vmm.partition import Partition, PartitionConfig

pytestmark = pytest.mark.kvm

COUNTER_ADDR = 0x200000  # osvmm/guests/src/counter.c
TICKER_COUNTS, TICKER_PIT, TICKER_LAPIC = 0x200000, 0x200200, 0x200208  # ticker.c


class Console:
    def __init__(self):
        self.data = bytearray()
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self.lock:
            self.data += data

    def text(self) -> str:
        with self.lock:
            return self.data.decode()


def u64(part, gpa: int) -> int:
    return struct.unpack("<Q", part.read_guest(gpa, 8))[0]


def ram_hash(part) -> str:
    h = hashlib.sha256()
    for gpa, size in part.machine.ram_ranges:
        h.update(part.read_guest(gpa, size))
    return h.hexdigest()


def wait_for(pred, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def snapshot_and_stop(part, directory) -> dict:
    """Snapshot ``part`` and stop it; what it was at the pause."""
    seen = {}

    def then():
        seen["hash"] = ram_hash(part)
        part.stop(0, "stopped after a snapshot")

    written, paused_ms = part.snapshot(str(directory), then=then)
    seen["written"], seen["paused_ms"] = written, paused_ms
    part.wait(10)
    return seen


def counter_lines(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"counter: (\d+)\n", text)]


@pytest.mark.parametrize(
    "lazy,ready",
    [(True, False), (False, False), (True, True), (False, True)],
    ids=["mapped", "copied", "mapped-onto-a-ready-vm", "copied-a-ready-vm-closed"],
)
def test_the_counter_goes_on_without_a_gap_or_a_repeat(tmp_path, lazy, ready):
    """``ready``: a VM made ahead (vmm/ready.py) is given; a mapped restore takes it,
    a copied one (it does not fit) closes it and makes its own."""
    from osvmm.kvm import Kvm
    from osvmm.vmm.ready import ReadyVm

    every = 1 << 22
    machine = Machine.build(16 << 20, 1)
    before = Console()
    part = Partition(
        PartitionConfig(
            machine, image=str(guest_path("counter")), console=before, cmdline=f"every={every}"
        )
    ).build()
    try:
        part.start()
        wait_for(lambda: len(counter_lines(before.text())) >= 3)
        seen = snapshot_and_stop(part, tmp_path / "snap")
        count_at_pause = u64(part, COUNTER_ADDR)
    finally:
        part.close()
    assert seen["written"].bytes_stored < 1 << 20  # a few hundred KiB touched of 16 MiB

    after = Console()
    kvm = Kvm()
    made = ReadyVm.make(kvm, machine) if ready else None
    made_vm = made.vm if made else None
    back = Partition(
        PartitionConfig(machine, console=after, restore=str(tmp_path / "snap"), restore_lazy=lazy),
        kvm,
        ready=made,
    ).build()
    try:
        if made is not None:
            assert made.vm is None and not made.vcpus and not made.reserved  # taken or closed
            assert (back.vm is made_vm) == lazy == back.built_ready
        assert ram_hash(back) == seen["hash"]  # memory at resume is memory at pause
        assert u64(back, COUNTER_ADDR) == count_at_pause
        assert {r.backing for r in back.memory.regions} == {"file" if lazy else "memfd"}
        back.start()
        wait_for(lambda: len(counter_lines(after.text())) >= 3)
        assert u64(back, COUNTER_ADDR) > count_at_pause
    finally:
        back.stop()
        back.wait(10)
        back.close()
        kvm.close()
    # The console goes on where it stopped: one run's lines, then the other's.
    lines = counter_lines(before.text() + after.text())
    assert lines == [every * (i + 1) for i in range(len(lines))], lines


@pytest.mark.parametrize("ready", [False, True], ids=["built", "onto-a-ready-vm"])
def test_an_smp_guest_goes_on_on_every_vcpu_and_its_timers_keep_firing(tmp_path, ready):
    from osvmm.kvm import Kvm
    from osvmm.vmm.ready import ReadyVm

    machine = Machine.build(16 << 20, 2)
    before = Console()
    part = Partition(
        PartitionConfig(
            machine, image=str(guest_path("ticker")), console=before, cmdline="every=10"
        )
    ).build()
    try:
        part.start()
        wait_for(lambda: "ticker: pit 20 " in before.text())
        seen = snapshot_and_stop(part, tmp_path / "snap")
        paused = {
            "cpu0": u64(part, TICKER_COUNTS),
            "cpu1": u64(part, TICKER_COUNTS + 8),
            "pit": u64(part, TICKER_PIT),
            "lapic": u64(part, TICKER_LAPIC),
        }
    finally:
        part.close()
    assert "ticker: 2 cpus counting" in before.text()
    assert paused["cpu1"] > 0 and paused["lapic"] > 0

    after = Console()
    kvm = Kvm()
    made = ReadyVm.make(kvm, machine) if ready else None  # both vCPUs made ahead
    made_vm = made.vm if made else None
    back = Partition(
        PartitionConfig(machine, console=after, restore=str(tmp_path / "snap")), kvm, ready=made
    ).build()
    try:
        assert (back.vm is made_vm) == ready
        assert ram_hash(back) == seen["hash"]
        back.start()
        wait_for(
            lambda: (
                u64(back, TICKER_PIT) >= paused["pit"] + 20
                and u64(back, TICKER_LAPIC) >= paused["lapic"] + 5
                and u64(back, TICKER_COUNTS) > paused["cpu0"]
                and u64(back, TICKER_COUNTS + 8) > paused["cpu1"]
            )
        )
        wait_for(lambda: "ticker: pit" in after.text())
    finally:
        back.stop()
        back.wait(10)
        back.close()
        kvm.close()
    ticks = [int(n) for n in re.findall(r"ticker: pit (\d+) ", before.text() + after.text())]
    assert ticks == [10 * (i + 1) for i in range(len(ticks))], ticks


def test_a_snapshot_of_a_running_partition_lets_it_go_on(tmp_path):
    machine = Machine.build(8 << 20, 1)
    part = Partition(
        PartitionConfig(machine, image=str(guest_path("counter")), console=Console())
    ).build()
    try:
        part.start()
        wait_for(lambda: u64(part, COUNTER_ADDR) > 0)
        written, paused_ms = part.snapshot(str(tmp_path / "snap"))
        assert part.running and paused_ms < 5000
        at = u64(part, COUNTER_ADDR)
        wait_for(lambda: u64(part, COUNTER_ADDR) > at)
        # The directory can take another snapshot over the first.
        part.snapshot(str(tmp_path / "snap"))
    finally:
        part.stop()
        part.wait(10)
        part.close()
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["memory", "state"]


def rewrite_state(directory, change) -> None:
    path = directory / "state"
    state = fmt.decode(path.read_bytes())
    change(state)
    path.write_bytes(fmt.encode(state))


@pytest.fixture(scope="module")
def counter_snapshot(tmp_path_factory):
    directory = tmp_path_factory.mktemp("snaps") / "counter"
    part = Partition(
        PartitionConfig(
            Machine.build(8 << 20, 1), image=str(guest_path("counter")), console=Console()
        )
    ).build()
    try:
        part.start()
        wait_for(lambda: u64(part, COUNTER_ADDR) > 0)
        snapshot_and_stop(part, directory)
    finally:
        part.close()
    return directory


def restore_error(directory) -> str:
    with pytest.raises(SnapshotError) as err:
        Partition(
            PartitionConfig(Machine.build(8 << 20, 1), restore=str(directory))
        ).build().close()
    assert "\n" not in str(err.value)
    return str(err.value)


def copy_of(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_host_without_a_cpu_feature_of_the_snapshot_refuses_it(counter_snapshot, tmp_path):
    snap = copy_of(counter_snapshot, tmp_path / "s")

    def add_feature(state):
        cpuid = bytearray(state["vcpus"][0]["cpuid"])
        for off in range(0, len(cpuid), 40):
            function, index = struct.unpack_from("<II", cpuid, off)
            if function == 0x7 and index == 0:
                ebx = struct.unpack_from("<I", cpuid, off + 16)[0]
                struct.pack_into("<I", cpuid, off + 16, ebx | 0xFFFFFFFF)
        state["vcpus"][0]["cpuid"] = bytes(cpuid)

    rewrite_state(snap, add_feature)
    assert "incompatible host" in restore_error(snap)
    assert "CPUID" in restore_error(snap)


def test_a_host_with_another_tsc_frequency_refuses_it(counter_snapshot, tmp_path):
    snap = copy_of(counter_snapshot, tmp_path / "s")
    rewrite_state(snap, lambda st: st["vcpus"][0].update(tsc_khz=st["vcpus"][0]["tsc_khz"] // 2))
    message = restore_error(snap)
    assert "incompatible host" in message and "TSC" in message


def test_another_machine_refuses_it(counter_snapshot):
    with pytest.raises(SnapshotError) as err:
        Partition(
            PartitionConfig(Machine.build(16 << 20, 1), restore=str(counter_snapshot))
        ).build().close()
    assert "does not fit" in str(err.value) and "memory 8 MiB" in str(err.value)


def test_a_memslot_kvm_refuses_fails_the_restore_in_one_line_and_leaves_nothing(
    counter_snapshot, monkeypatch
):
    from osvmm.kvm.system import Vm

    def refuse(self, slot, *args, **kwargs):
        raise KvmError(errno.ENOMEM, "KVM_SET_USER_MEMORY_REGION")

    monkeypatch.setattr(Vm, "set_user_memory_region", refuse)
    fds, threads = set(os.listdir("/proc/self/fd")), threading.active_count()
    part = Partition(PartitionConfig(Machine.build(8 << 20, 1), restore=str(counter_snapshot)))
    with pytest.raises(KvmError) as err:
        part.build()
    part.close()
    assert str(err.value).startswith("KVM_SET_USER_MEMORY_REGION failed: ENOMEM")
    assert "\n" not in str(err.value)
    assert part.vm is None and part.vcpus == []  # the VM closed as the build failed
    assert threading.active_count() == threads
    assert set(os.listdir("/proc/self/fd")) == fds
