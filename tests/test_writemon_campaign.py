"""The write monitor on a running guest (needs /dev/kvm): wmkernel's legitimate
writes all pass, and a seeded fault-injection campaign (Chariot's and Mondrix's
method: the driver makes N random wild writes: stores of 1-8 bytes, rep stos,
rep movs, stores straddling permission boundaries) is caught word for word
under log and deny, with the window's memory equal to a model of what each
policy applies; under fault the partition stops at the first wild write.
The expected catches come from tests/wmkernel.py, a replay independent of the
monitor."""

from __future__ import annotations

import hashlib

import pytest

from osvmm.guests.build import guest_path
from osvmm.loader.ksyms import read_symbols
from osvmm.machine import Machine
from osvmm.vmm.partition import Partition, PartitionConfig
from osvmm.writemon.monitor import WriteMonitor
from osvmm.writemon.records import ViolationLog
from osvmm.writemon.rules import resolve
from tests import wmkernel as wk

pytestmark = pytest.mark.kvm


def run_wmkernel(policy: str, cmdline: str, timeout: float = 120):
    image = str(guest_path("wmkernel"))
    machine = Machine.build(8 << 20, 1)
    rules = resolve(wk.protect_spec(policy), read_symbols(image), machine.ram_ranges)
    out = []
    part = Partition(
        PartitionConfig(machine=machine, image=image, cmdline=cmdline, console=out.append)
    ).build()
    try:
        monitor = WriteMonitor("wmkernel", rules, ViolationLog(keep=1 << 20))
        monitor.attach(part)
        monitor.arm()
        part.start()
        result = part.wait(timeout)
        assert result is not None, "wmkernel did not finish"
        window = part.memory.read(wk.WIN_START, wk.WIN_END - wk.WIN_START)
    finally:
        part.stop()
        part.close()
    return result, b"".join(out).decode(), monitor, window


def test_legitimate_writes_all_pass():
    result, console, monitor, window = run_wmkernel("deny", "mode=legit")
    assert "wmkernel: legit ok" in console, console
    assert result.status == 1 and result.fault is None  # debug exit 0
    assert monitor.log.counts()["total"] == 0  # no false positive
    assert monitor.stats()["trapped_writes"] > 100  # they were checked, not waved through
    assert window == wk.model_window(wk.legit_writes())


@pytest.mark.parametrize("policy", ["deny", "log"])
def test_wild_write_campaign(policy):
    seed, count = 20260101, 1500
    result, console, monitor, window = run_wmkernel(policy, f"mode=wild count={count} seed={seed}")
    assert f"wmkernel: wild {count} done" in console, console
    assert result.fault is None
    wild = wk.wild_writes(seed, count)
    expected = wk.expected_caught(wild)
    got = wk.recorded(monitor.log.last())
    missed, false = expected - got, got - expected
    print(
        f"\ncampaign {policy}: {count} wild writes, {sum(expected.values())} protected bytes "
        f"hit, {sum(got.values())} caught, {sum(missed.values())} missed, "
        f"{sum(false.values())} caught wrongly"
    )
    assert not missed and not false
    assert sum(expected.values()) > 1000  # the campaign did hit protected words
    decision = {"deny": "denied", "log": "logged"}[policy]
    assert {v.decision for v in monitor.log.last()} == {decision}
    assert {(v.domain, v.cpl) for v in monitor.log.last()} == {("driver", 3)}
    legit = wk.legit_writes()
    if policy == "deny":
        assert window == wk.model_window(legit + wk.without_caught(wild))
        # the protected words the driver may not write hash as before the campaign
        protected = [b for b in range(wk.WIN_START, wk.WIN_END) if wk.caught_by_driver(b)]
        before = wk.model_window(legit)
        digest = hashlib.sha256(bytes(window[b - wk.WIN_START] for b in protected)).hexdigest()
        assert (
            digest == hashlib.sha256(bytes(before[b - wk.WIN_START] for b in protected)).hexdigest()
        )
    else:
        assert window == wk.model_window(legit + wild)  # logged: applied


def test_fault_policy_stops_at_the_first_wild_write():
    seed = 7
    result, console, monitor, _ = run_wmkernel("fault", f"mode=wild count=500 seed={seed}")
    assert "wmkernel: legit ok" in console and "wild 500 done" not in console
    assert result.status == 4 and "write monitor: domain driver wrote" in result.reason
    records = monitor.log.last()
    assert len(records) == 1 and records[0].decision == "fault"
    caught = [
        [a + i for i in range(len(d)) if wk.caught_by_driver(a + i)]
        for a, d in wk.wild_writes(seed, 500)
    ]
    first = next(c for c in caught if c)
    assert records[0].gpa == first[0]
