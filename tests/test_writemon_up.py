"""The write monitor under ``osvmm up`` (needs /dev/kvm): declared in the plan and
armed at boot, added and armed at run time with ``osvmm protect``, read back
with ``osvmm violations`` and ``osvmm stat``, noted in the console log; and the
fault policy restarting a partition while a counter beside it keeps counting."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import pytest

from osvmm.errors import ControlError
from osvmm.plan.config import parse_plan
from osvmm.plan.placement import place
from osvmm.plan.topology import read_topology
from osvmm.up.protocol import call
from osvmm.up.supervisor import FAILED, RUNNING, Supervisor
from osvmm.up.writemon import WriteMonitors
from tests import wmkernel as wk
from tests.test_supervisor_up import UpProcess

pytestmark = pytest.mark.kvm

COUNTER_ADDR = 0x200000  # osvmm/guests/src/counter.c
PATTERN_ADDR, PATTERN_SIZE = 0x201000, 0x10000


def wmkernel_partition(cmdline: str, policy: str = "deny", extra: str = "") -> str:
    return f"""
[[partition]]
name = "wmk"
cpus = "floating"
memory = "8M"
image = "guests:wmkernel"
cmdline = "{cmdline}"
{extra}
{wk.protect_toml(policy)}
"""


def test_plan_protection_violations_stat_and_console_log_through_the_cli():
    seed, count = 3, 300
    up = UpProcess(wmkernel_partition(f"mode=wild count={count} seed={seed}"))
    try:
        up.wait_for(lambda p: p["wmk"]["state"] == "stopped")
        expected = wk.expected_caught(wk.wild_writes(seed, count))
        n = sum(expected.values())  # bytes; records are runs of them
        records, since = [], 0
        while True:  # page through them, 200 at a time
            r = up.cli("violations", "wmk", "--since", str(since), "--last", "200", "--json")
            assert r.returncode == 0, r.stderr
            reply = json.loads(r.stdout)
            if not reply["violations"]:
                break
            assert [v["seq"] for v in reply["violations"]] == list(
                range(since, since + len(reply["violations"]))
            )
            records += reply["violations"]
            since = records[-1]["seq"] + 1
        got = wk.recorded(_Record(v) for v in records)
        assert got == expected and reply["counts"]["denied"] == len(records)
        assert up.cli("violations", "wmk", "--last", "201").returncode == 2
        text = up.cli("violations", "wmk", "--last", "3").stdout.decode()
        assert text.splitlines()[0].split() == [
            "SEQ", "TIME", "VCPU", "RIP", "CPL", "DOMAIN", "GPA", "SIZE", "OLD", "ATTEMPTED",
            "DECISION",
        ]  # fmt: skip
        assert len(text.splitlines()) == 5 and " driver " in text and "denied" in text
        total = reply["counts"]["total"]
        assert f"wmk: {total} violations (0 logged, {total} denied, 0 fault); 3 shown" in text
        stat = up.cli("stat", "wmk").stdout.decode()
        assert "write monitor: armed, policy deny, 3 pages;" in stat
        assert f"{total} violations (0 logged, {total} denied, 0 fault)" in stat
        shown = up.cli("protect", "wmk").stdout.decode()
        assert "protected  0x400000..0x400800, 0x400900..0x402800" in shown
        assert "grant driver  0x400100..0x400110, 0x401ff8..0x402008" in shown
        console = (up.logs / "wmk.console.log").read_text()
        assert "[osvmm: write monitor: denied: vcpu 0 rip" in console
        assert "[osvmm: write monitor: further violations of this run are counted only]" in console
        assert f"wmkernel: wild {count} done" in console
        log = (up.logs / "osvmm.log").read_text()
        assert "wmk: write monitor armed (deny): 9984 protected bytes on 3 pages" in log
        assert n > 0
    finally:
        up.close()


class _Record:
    """A violation as the JSON answer gives it, with the fields recorded() reads."""

    def __init__(self, v: dict):
        self.gpa = int(v["gpa"], 16)
        self.attempted = bytes.fromhex(v["attempted"])


def test_protect_arms_and_disarms_a_running_partition_at_run_time():
    # wmkernel's work loop: a dword store to 0x400200 every 2M iterations, forever
    up = UpProcess(
        """
[[partition]]
name = "worker"
cpus = "floating"
memory = "8M"
image = "guests:wmkernel"
cmdline = "mode=work iters=0x4000000000000000 every=2000000 target=0x400200"
"""
    )
    try:
        up.wait_for(lambda p: p["worker"]["state"] == "running", timeout=60)
        with pytest.raises(ControlError, match="nothing to protect"):
            call(up.sock, "POST", "/v1/partitions/worker/protection", {"arm": True})
        r = up.cli(
            "protect", "worker", "--range", "0x400200+4", "--policy", "log", "--arm", "--json"
        )
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert reply["rules"]["protected"] == [["0x400200", "0x400204"]]
        assert reply["monitor"]["armed"] and reply["monitor"]["pages"] == 1

        def counts():  # straight over the socket (the CLI's text is tested above)
            return call(up.sock, "GET", "/v1/partitions/worker/violations")

        deadline = time.monotonic() + 60  # generous: a loaded 2-CPU host once took over 20 s
        while (first := counts())["counts"]["logged"] < 3:
            assert time.monotonic() < deadline, first
            time.sleep(0.1)
        v = first["violations"][-1]
        assert (v["domain"], v["gpa"], v["size"], v["cpl"]) == ("-", "0x400200", 4, 3)
        assert v["decision"] == "logged"
        r = up.cli("protect", "worker", "--disarm")
        assert r.returncode == 0 and "write monitor disarmed" in r.stdout.decode()
        settled = counts()["counts"]
        time.sleep(0.3)
        assert counts()["counts"] == settled
        assert call(up.sock, "GET", "/v1/vmm")["partitions"][0]["state"] == "running"
        with pytest.raises(ControlError, match="grants: no domain is named 'nobody'"):
            body = {"grants": {"nobody": ["0+4"]}}
            call(up.sock, "POST", "/v1/partitions/worker/protection", body)
    finally:
        up.close()


def test_fault_policy_restarts_the_partition_while_a_neighbour_keeps_counting(tmp_path):
    cpus = '"1"' if os.cpu_count() >= 2 else '"floating"'
    body = f"""
[vmm]
control_socket = "{tmp_path}/s"

[[partition]]
name = "counter"
cpus = {cpus}
memory = "8M"
image = "guests:counter"
""" + wmkernel_partition(
        "mode=wild count=100 seed=5",
        "fault",
        'restart = "restart"\nrestart_limit = 2\nrestart_backoff_ms = 20',
    )
    sup = Supervisor(place(parse_plan(body, tmp_path), read_topology()), str(tmp_path / "logs"))
    monitors = WriteMonitors(sup)
    try:
        sup.start_all()
        counter, wmk = sup.partitions["counter"], sup.partitions["wmk"]
        deadline = time.monotonic() + 30
        while counter.state != RUNNING or counter.partition is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        mem = counter.partition.memory

        def count() -> int:
            return struct.unpack("<Q", mem.read(COUNTER_ADDR, 8))[0]

        while count() == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        pattern = hashlib.sha256(bytes((i * 7 + 1) & 0xFF for i in range(PATTERN_SIZE))).digest()
        samples = [count()]
        while wmk.state != FAILED:
            assert time.monotonic() < deadline, wmk.state
            time.sleep(0.05)
            samples.append(count())
            assert hashlib.sha256(mem.read(PATTERN_ADDR, PATTERN_SIZE)).digest() == pattern
        assert all(b > a for a, b in zip(samples, samples[1:], strict=False)), samples
        assert wmk.boots == 3 and wmk.restarts == 2
        assert "write monitor: domain driver wrote" in wmk.reason
        records = monitors.states["wmk"].log.last()
        assert [r.decision for r in records] == ["fault"] * 3  # one per run, the same one
        assert len({(r.gpa, r.attempted) for r in records}) == 1
        assert counter.state == RUNNING and counter.boots == 1
    finally:
        sup.close()
