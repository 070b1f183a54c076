"""Read-only RAM pages under a running guest (Partition.protect_pages, vCPU parking
and the RAM write handler), with the counter guest (needs /dev/kvm)."""

from __future__ import annotations

import struct
import time

import pytest

from osvmm.guests.build import guest_path
from osvmm.machine import Machine
from osvmm.vmm.partition import Partition, PartitionConfig

pytestmark = pytest.mark.kvm

COUNTER_ADDR = 0x200000  # osvmm/guests/src/counter.c


def wait_until(pred, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def counter():
    part = Partition(
        PartitionConfig(machine=Machine.build(8 << 20, 1), image=str(guest_path("counter")))
    ).build()
    yield part
    part.stop()
    part.close()


def count(part) -> int:
    return struct.unpack("<Q", part.memory.read(COUNTER_ADDR, 8))[0]


def test_parked_vcpu_stops_and_resumes(counter):
    counter.start()
    wait_until(lambda: count(counter) > 0)
    thread = counter.threads[0]
    assert thread.park()
    a = count(counter)
    time.sleep(0.1)
    assert count(counter) == a  # held out of KVM_RUN
    thread.unpark()
    wait_until(lambda: count(counter) > a)
    counter.stop()
    assert counter.wait(5) is not None and not thread.alive
    assert thread.park() is False  # nothing to hold


def test_protecting_a_page_at_run_time_sends_its_writes_to_the_handler(counter):
    seen = []

    def handler(thread, addr, data):
        if not counter.memory.contains(addr, len(data)):
            return False
        seen.append((thread.index, addr, len(data)))
        counter.memory.write(addr, data)  # apply it: the guest must not notice
        return True

    counter.set_ram_write_handler(handler)
    counter.start()
    wait_until(lambda: count(counter) > 0)
    counter.protect_pages([(COUNTER_ADDR, COUNTER_ADDR + 4096)])
    assert counter.protected_pages() == ((COUNTER_ADDR, COUNTER_ADDR + 4096),)
    wait_until(lambda: len(seen) >= 20)
    assert all(s == (0, COUNTER_ADDR, 8) for s in seen[:20])
    before = count(counter)
    wait_until(lambda: count(counter) > before)  # applied writes: it counts on
    counter.protect_pages([])
    n = len(seen)
    time.sleep(0.1)
    assert len(seen) == n  # writable again: no more exits
    fast = count(counter)
    wait_until(lambda: count(counter) > fast + 1_000_000)  # native speed again
    assert counter.result is None  # the guest ran on throughout
