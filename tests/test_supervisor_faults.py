"""Fault containment: a partition that triple-faults is restarted by its policy
(backoff doubling, then the limit) while a counting partition beside it never
stalls and its memory is untouched (needs /dev/kvm)."""

from __future__ import annotations

import hashlib
import os
import struct
import time

import pytest

from osvmm.plan.config import parse_plan
from osvmm.plan.placement import place
from osvmm.plan.topology import read_topology
from osvmm.up.supervisor import FAILED, RUNNING, STOPPED, Supervisor

pytestmark = pytest.mark.kvm

COUNTER_ADDR = 0x200000  # osvmm/guests/src/counter.c
PATTERN_ADDR, PATTERN_SIZE = 0x201000, 0x10000


def supervisor(tmp_path, body: str) -> Supervisor:
    plan = parse_plan(f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n' + body, tmp_path)
    return Supervisor(place(plan, read_topology()), log_dir=str(tmp_path / "logs"))


def wait_until(pred, timeout: float = 20, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)


def test_counter_never_stalls_while_a_neighbour_faults_and_restarts(tmp_path):
    cpus = '"1"' if os.cpu_count() >= 2 else '"floating"'
    sup = supervisor(
        tmp_path,
        f"""
[[partition]]
name = "counter"
cpus = {cpus}
memory = "8M"
image = "guests:counter"

[[partition]]
name = "crash"
cpus = "floating"
memory = "4M"
image = "guests:triplefault"
restart = "restart"
restart_limit = 4
restart_backoff_ms = 20
""",
    )
    try:
        sup.start_all()
        counter, crash = sup.partitions["counter"], sup.partitions["crash"]
        wait_until(lambda: counter.state == RUNNING)
        part = counter.partition
        mem = part.memory

        def count() -> int:
            return struct.unpack("<Q", mem.read(COUNTER_ADDR, 8))[0]

        wait_until(lambda: count() > 0)
        expected = hashlib.sha256(bytes((i * 7 + 1) & 0xFF for i in range(PATTERN_SIZE)))
        samples = [count()]
        pattern_ok = []
        # Sample until the faulting partition has used up its restarts, and a bit more.
        end = None
        while end is None or time.monotonic() < end:
            time.sleep(0.05)
            samples.append(count())
            pattern_ok.append(
                hashlib.sha256(mem.read(PATTERN_ADDR, PATTERN_SIZE)).digest() == expected.digest()
            )
            if end is None and crash.state == FAILED:
                end = time.monotonic() + 0.3
            assert len(samples) < 400, f"crash never gave up: {crash.state}, {crash.boots}"
        # It kept counting: never backwards, and never flat for long. A flat sample or
        # two is the host's doing (2 shared cores under load steal the "dedicated" one
        # now and then); a partition stalled by its neighbour's faults and restarts
        # would stay flat for the backoffs (20-160 ms each) and the builds.
        assert all(b >= a for a, b in zip(samples, samples[1:], strict=False)), samples
        flat = longest = 0
        for a, b in zip(samples, samples[1:], strict=False):
            flat = flat + 1 if b == a else 0
            longest = max(longest, flat)
        assert longest < 6, f"the counter stood still for {longest} samples: {samples}"
        assert all(pattern_ok)
        # The counter ran throughout as the same partition; the faulting one was
        # booted afresh each time: 1 + restart_limit runs, then given up.
        assert counter.partition is part and counter.boots == 1 and counter.state == RUNNING
        assert crash.boots == 5 and crash.restarts == 4
        assert "triple fault" in crash.reason
        sup.flush_logs()
        sup.flush_logs()
        log = (tmp_path / "logs" / "osvmm.log").read_text()
        assert log.count("crash: ended: guest fault on vcpu 0") == 5
        for n, ms in ((1, 20), (2, 40), (3, 80), (4, 160)):
            assert f"crash: restart {n}/4 in {ms} ms" in log
        assert "crash: failed (restart limit 4 reached)" in log
        console = (tmp_path / "logs" / "crash.console.log").read_text()
        assert console.count("triplefault: about to fault\n") == 5
    finally:
        sup.close()


def test_stop_during_backoff_and_start_resets_the_count(tmp_path):
    sup = supervisor(
        tmp_path,
        """
[[partition]]
name = "crash"
cpus = "floating"
memory = "4M"
image = "guests:triplefault"
restart = "restart"
restart_limit = 10
restart_backoff_ms = 5000
""",
    )
    try:
        crash = sup.partitions["crash"]
        sup.start_all()
        wait_until(lambda: crash.state == "backoff")
        assert crash.restarts == 1
        t0 = time.monotonic()
        assert sup.stop("crash") == STOPPED
        assert time.monotonic() - t0 < 2  # the backoff wait is cut short
        assert sup.start("crash") in (RUNNING, "backoff")
        wait_until(lambda: crash.boots == 2 and crash.state == "backoff")
        assert crash.restarts == 1  # counted afresh after a user's start
    finally:
        sup.close()


def test_stop_policy_leaves_a_faulted_partition_failed(tmp_path):
    sup = supervisor(
        tmp_path,
        """
[[partition]]
name = "crash"
cpus = "floating"
memory = "4M"
image = "guests:triplefault"
""",
    )
    try:
        sup.start_all()
        crash = sup.partitions["crash"]
        wait_until(lambda: crash.state == FAILED)
        assert crash.boots == 1 and crash.partition is None
        sup.flush_logs()
        assert "(policy stop)" in (tmp_path / "logs" / "osvmm.log").read_text()
    finally:
        sup.close()


def test_a_vmm_bug_on_a_vcpu_thread_fails_the_partition_with_its_traceback_logged(
    tmp_path, monkeypatch
):
    """A bug in the VMM (here: the UART model raising on the guest's first byte) is
    reported in one line, the traceback goes to the partition's log, and the
    partition ends failed: never stuck in booting or running."""
    from osvmm.devices.serial import Serial

    def broken_write(self, offset, value):
        raise ZeroDivisionError("injected UART bug")

    monkeypatch.setattr(Serial, "write", broken_write)
    sup = supervisor(
        tmp_path,
        '[[partition]]\nname = "hello"\ncpus = "floating"\nmemory = "4M"\n'
        'image = "guests:hello"\nrestart = "restart"\nrestart_limit = 1\n'
        "restart_backoff_ms = 10\n",
    )
    try:
        sup.start_all()
        entry = sup.partitions["hello"]
        wait_until(lambda: entry.state == FAILED)
        assert entry.reason.startswith("internal error in the VMM (vcpu 0): ZeroDivisionError")
        assert "\n" not in entry.reason
        sup.flush_logs()
        log = (tmp_path / "logs" / "osvmm.log").read_text()
        assert "Traceback (most recent call last)" in log and "broken_write" in log
        assert entry.restarts == 1  # its policy applied, as for any fault
    finally:
        sup.close()


def test_a_vmm_bug_while_building_fails_the_partition(tmp_path, monkeypatch):
    from osvmm.vmm import partition

    def broken_build(self):
        raise KeyError("injected build bug")

    monkeypatch.setattr(partition.Partition, "build", broken_build)
    sup = supervisor(
        tmp_path,
        '[[partition]]\nname = "hello"\ncpus = "floating"\nmemory = "4M"\nimage = "guests:hello"\n',
    )
    try:
        assert sup.start("hello", timeout=10) == FAILED
        entry = sup.partitions["hello"]
        assert "internal error in the VMM (building hello): KeyError" in entry.reason
        sup.flush_logs()
        assert "Traceback" in (tmp_path / "logs" / "osvmm.log").read_text()
        assert sup.start("hello", timeout=10) == FAILED  # a user may start it again
    finally:
        sup.close()
