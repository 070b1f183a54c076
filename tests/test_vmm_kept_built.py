"""Partitions kept built between boots (Partition.recycle, vmm/reset.py): nothing of a
boot leaks into the next. The leftover guest reports what an earlier boot could have
left (memory, CPU registers and MSRs, PIT, PICs, I/O APIC, LAPIC, the VMM's devices),
then leaves all of it behind; every boot of a kept partition must report what a
fresh partition reports (needs /dev/kvm)."""

from __future__ import annotations

import threading
import time

import pytest

from osvmm.guests.build import guest_path
from osvmm.kvm import Kvm
from osvmm.machine import Machine
from osvmm.plan.config import parse_plan
from osvmm.plan.placement import place
from osvmm.plan.topology import read_topology
from osvmm.up.supervisor import RUNNING, STOPPED, Supervisor
from osvmm.vmm.partition import Partition, PartitionConfig

pytestmark = pytest.mark.kvm

REPORTS = ("leftover: memory", "leftover: devices", "leftover: xmm5")


class Console:
    def __init__(self):
        self.chunks: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.chunks.append(data)

    def take(self) -> str:
        text = b"".join(self.chunks).decode(errors="replace")
        self.chunks.clear()
        return text


def reports(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(REPORTS)]


def boot(part: Partition, console: Console) -> str:
    part.start()
    result = part.wait(30)
    assert result is not None and result.fault is None, result
    return console.take()


@pytest.fixture(scope="module")
def kvm():
    k = Kvm()
    yield k
    k.close()


def partition(kvm, console, vcpus: int = 1, image: str = "leftover", cmdline: str = ""):
    config = PartitionConfig(
        Machine.build(64 << 20, vcpus),
        image=str(guest_path(image)),
        cmdline=cmdline,
        console=console,
        reusable=True,
    )
    return Partition(config, kvm).build()


def test_a_recycled_partition_boots_as_a_fresh_one(kvm):
    console = Console()
    fresh = partition(kvm, console)
    try:
        first = boot(fresh, console)
    finally:
        fresh.close()
    assert "leftover: clean" in first, first
    programmed = next(ln for ln in first.splitlines() if ln.startswith("leftover: programmed"))
    devices = next(ln for ln in first.splitlines() if ln.startswith("leftover: devices"))
    # The guest did change every device it reports (else the comparison proves nothing).
    for field in ("pit=", "pic_imr=", "ioapic=", "unmasked=", "lapic=", "lvtt=", "tmict="):
        before = devices.split(field)[1].split()[0]
        after = programmed.split(field)[1].split()[0]
        assert before != after, (field, devices, programmed)

    kept = partition(kvm, console)
    try:
        for n in range(3):
            text = boot(kept, console)
            assert "leftover: clean" in text, (n, text)
            assert reports(text) == reports(first), n
            kept.recycle()
            assert not kept.running
    finally:
        kept.close()


def test_a_recycled_partition_counts_only_its_new_boot_in_its_statistics(kvm):
    console = Console()
    part = partition(kvm, console, image="hello")
    try:
        boot(part, console)
        first = part.exit_stats()[0]
        part.recycle()
        assert part.exit_stats()[0]["vmm"] == {}
        boot(part, console)
        again = part.exit_stats()[0]
        assert again["vmm"]["IoOut"] == first["vmm"]["IoOut"]
        assert 0 < again["kvm"]["exits"] <= 2 * first["kvm"]["exits"]
    finally:
        part.close()


def test_statistics_of_a_vcpu_that_never_exits_are_read_while_it_runs(kvm):
    """The statistics are read without the vCPU's lock (which KVM_RUN holds): a
    CPL3 loop that never exits does not keep ``exit_stats`` waiting."""
    part = Partition(
        PartitionConfig(
            Machine.build(8 << 20, 1),
            image=str(guest_path("counter")),
            cmdline="every=0x4000000000000000",
        ),
        kvm,
    ).build()
    try:
        part.start()
        deadline = time.monotonic() + 20
        while int.from_bytes(part.memory.read(0x200000, 8), "little") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        out = []
        reader = threading.Thread(target=lambda: out.append(part.exit_stats()), daemon=True)
        reader.start()
        reader.join(10)
        assert out and out[0][0]["kvm"]["exits"] >= 1
    finally:
        part.stop()
        part.close()


def test_smp_partition_starts_its_aps_again_after_a_recycle(kvm):
    console = Console()
    part = partition(kvm, console, vcpus=2, image="smp", cmdline="wait_ms=200")
    try:
        for _ in range(2):
            assert boot(part, console) == "cpu 0 online\ncpu 1 online\n2 cpus online\n"
            part.recycle()
    finally:
        part.close()


def test_a_partition_stopped_before_it_ran_is_recycled_and_closed_cleanly(kvm):
    console = Console()
    part = partition(kvm, console, image="hello")
    try:
        boot(part, console)
        part.recycle()  # its vCPU threads wait at their gate
        assert all(t.alive for t in part.threads)
        part.stop(0, "stopped before it started")
        part.recycle()  # the held threads end; new ones wait
        assert boot(part, console) == "Hello from osvmm guest\n"
        part.recycle()
    finally:
        part.close()
    assert not any(t.alive for t in part.threads)


def test_recycle_refuses_a_running_or_not_reusable_partition(kvm):
    from osvmm.errors import VmmBug

    console = Console()
    part = Partition(
        PartitionConfig(Machine.build(8 << 20, 1), image=str(guest_path("counter"))), kvm
    ).build()
    try:
        with pytest.raises(VmmBug, match="not built reusable"):
            part.recycle()
    finally:
        part.close()
    part = partition(kvm, console, image="counter")
    try:
        part.start()
        with pytest.raises(VmmBug, match="is running"):
            part.recycle()
    finally:
        part.stop()
        part.close()


def test_supervisor_keeps_a_stopped_partition_built_and_reboots_it_clean(tmp_path):
    plan = parse_plan(
        f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n\n[[partition]]\nname = "lo"\n'
        f'cpus = "floating"\nmemory = "64M"\nimage = "guests:leftover"\ncmdline = "reset=1"\n',
        tmp_path,
    )
    sup = Supervisor(place(plan, read_topology()), log_dir=str(tmp_path / "logs"))
    seen: list[Partition] = []
    sup.on_build.append(lambda entry, part: seen.append(part))
    entry = sup.partitions["lo"]
    console = Console()
    entry.console.write = console  # the guest's output, as the hub would get it
    done = threading.Event()

    def count_boots(entry_, part):
        if len(seen) >= 4:
            done.set()

    sup.on_end.append(count_boots)
    try:
        sup.start("lo")  # it resets itself at the end of every boot: rebooted at once
        assert done.wait(60), console.take()
        sup.stop("lo")
        deadline = time.monotonic() + 20
        while entry.state != STOPPED or entry.ready is None:
            assert time.monotonic() < deadline, entry.state
            time.sleep(0.02)
        text = console.take()
        assert seen[1:] == [seen[0]] * (len(seen) - 1)  # one Partition, kept built
        assert entry.ready is seen[0]
        # The stop may cut the last boot short, before it has reported.
        clean = text.count("leftover: clean")
        assert len(seen) - 1 <= clean <= len(seen) and clean >= 4, (clean, len(seen), text)
        assert "found" not in text
        boots = [reports("leftover: memory" + c) for c in text.split("leftover: memory")[1:]]
        assert len(boots) >= clean and all(b == boots[0] for b in boots[:clean])
        # A user's start boots the kept partition again, still clean.
        sup.start("lo")
        assert entry.state == RUNNING
        deadline = time.monotonic() + 20
        while "leftover: clean" not in "".join(c.decode() for c in console.chunks):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        sup.stop("lo")
        assert len({id(p) for p in seen}) == 1
    finally:
        sup.close()
    assert entry.ready is None  # closed with the supervisor


def test_supervisor_builds_anew_when_the_image_changed_on_disk(tmp_path):
    import os
    import shutil

    image = tmp_path / "hello.elf"
    shutil.copy(guest_path("hello"), image)
    plan = parse_plan(
        f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n\n[[partition]]\nname = "h"\n'
        f'cpus = "floating"\nmemory = "8M"\nimage = "{image}"\n',
        tmp_path,
    )
    sup = Supervisor(place(plan, read_topology()), log_dir=str(tmp_path / "logs"))
    seen: list[Partition] = []
    sup.on_build.append(lambda entry, part: seen.append(part))
    entry = sup.partitions["h"]

    def boot_once():
        sup.start("h")
        deadline = time.monotonic() + 20
        while entry.state != STOPPED or entry.ready is None:
            assert time.monotonic() < deadline, entry.state
            time.sleep(0.02)

    try:
        boot_once()
        boot_once()
        assert seen[0] is seen[1]  # kept built
        st = image.stat()
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        boot_once()
        assert seen[2] is not seen[1] and seen[1].vm.fd == -1  # the old one closed
        assert "changed on disk" in (tmp_path / "logs" / "osvmm.log").read_text()
    finally:
        sup.close()


def _hello_supervisor(tmp_path) -> Supervisor:
    plan = parse_plan(
        f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n\n[[partition]]\nname = "h"\n'
        f'cpus = "floating"\nmemory = "8M"\nimage = "guests:hello"\n',
        tmp_path,
    )
    return Supervisor(place(plan, read_topology()), log_dir=str(tmp_path / "logs"))


def _wait_kept(entry) -> None:
    deadline = time.monotonic() + 20
    while entry.state != STOPPED or entry.ready is None:
        assert time.monotonic() < deadline, entry.state
        time.sleep(0.02)


def test_a_user_start_of_a_kept_partition_lets_it_go_on_the_callers_thread(tmp_path):
    sup = _hello_supervisor(tmp_path)
    threads: list[str] = []
    sup.on_build.append(lambda entry, part: threads.append(threading.current_thread().name))
    entry = sup.partitions["h"]
    try:
        sup.start("h")  # the first boot builds it, on the entry's thread
        _wait_kept(entry)
        assert sup.start("h") in (RUNNING, STOPPED)  # kept: let go here, at once
        _wait_kept(entry)
        assert threads == ["sup-h", threading.current_thread().name]
        assert entry.boots == 2 and entry.reason == "debug exit with value 0"
    finally:
        sup.close()


def test_a_hook_failing_on_the_callers_thread_is_retried_by_the_entrys_thread(tmp_path):
    sup = _hello_supervisor(tmp_path)
    calls: list[str] = []

    def hook(entry, part):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:  # the second boot's first try, on the caller's thread
            raise RuntimeError("not now")

    sup.on_build.append(hook)
    entry = sup.partitions["h"]
    try:
        sup.start("h")
        _wait_kept(entry)
        first = entry.ready
        sup.start("h")
        _wait_kept(entry)
        assert calls == ["sup-h", threading.current_thread().name, "sup-h"]
        assert entry.boots == 2 and entry.ready is first  # the kept one ran, once
    finally:
        sup.close()


def test_a_stop_while_a_kept_partition_is_readied_leaves_it_stopped_and_kept(tmp_path):
    sup = _hello_supervisor(tmp_path)
    entry = sup.partitions["h"]
    stopper: list[threading.Thread] = []

    def hook(entry_, part):
        if entry_.boots == 1 and not stopper:  # the second boot, on the caller's thread
            t = threading.Thread(target=sup.stop, args=("h",))
            stopper.append(t)
            t.start()
            deadline = time.monotonic() + 10
            while entry_.want_running:  # the stop has landed
                assert time.monotonic() < deadline
                time.sleep(0.01)

    sup.on_build.append(hook)
    try:
        sup.start("h")
        _wait_kept(entry)
        kept = entry.ready
        assert sup.start("h") == STOPPED
        stopper[0].join(10)
        assert entry.state == STOPPED and entry.ready is kept and entry.boots == 1
        sup.start("h")  # and it still starts
        _wait_kept(entry)
        assert entry.boots == 2
    finally:
        sup.close()


def test_a_kept_partition_is_prepared_when_kept_and_its_next_boot_serves_hypercalls(tmp_path):
    """The hypercall port hook and the write monitor of a kept partition's next boot
    are put on it when it is kept (Supervisor.on_ready); its start only says it
    runs. Rules changed while it was stopped get a monitor made at the start."""
    from osvmm.up.hypercalls import serve_supervisor
    from osvmm.up.writemon import WriteMonitors
    from osvmm.writemon.rules import Rules

    plan = parse_plan(
        f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n\n[[partition]]\nname = "h"\n'
        f'cpus = "floating"\nmemory = "8M"\nimage = "guests:hcinfo"\n',
        tmp_path,
    )
    sup = Supervisor(place(plan, read_topology()), log_dir=str(tmp_path / "logs"))
    serve_supervisor(sup)
    monitors = WriteMonitors(sup)
    used = []  # the write monitor each boot ran with (hooks run in order)
    sup.on_build.append(lambda entry, part: used.append(monitors.states["h"].monitor))
    entry = sup.partitions["h"]
    console = Console()
    entry.console.write = console
    state = monitors.states["h"]
    try:
        sup.start("h")  # built on the entry's thread: nothing prepared ahead
        _wait_kept(entry)
        kept = entry.ready
        assert state.ready is not None and state.ready[:2] == (kept, kept.generation)
        prepared = state.ready[3]
        sup.start("h")
        _wait_kept(entry)
        assert used[1] is prepared and state.ready[3] is not prepared  # and the next made
        stale = state.ready[3]
        state.rules = Rules("log", ())  # what `osvmm protect` sets for a stopped partition
        sup.start("h")
        _wait_kept(entry)
        assert used[2] is not stale and used[2].rules is state.rules
        text = console.take()
        assert entry.boots == 3 and entry.ready is kept
        assert text.count("hcinfo: info=40 abi=1 id=0 vcpus=1 memory=0x800000") == 3, text
        assert text.count("hcinfo: console=36 misaligned=-22 short=-28 unknown=-38") == 3, text
    finally:
        sup.close()
