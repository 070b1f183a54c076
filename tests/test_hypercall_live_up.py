"""The hypercall layer under the ``osvmm up`` supervisor: a plan's ping and pong
partitions talk over their channel with doorbells (needs /dev/kvm)."""

from __future__ import annotations

import re
import time

import pytest

from osvmm.plan.config import parse_plan
from osvmm.plan.placement import place
from osvmm.plan.topology import read_topology
from osvmm.up.hypercalls import serve_supervisor
from osvmm.up.supervisor import STOPPED, Supervisor

pytestmark = pytest.mark.kvm

PLAN = """
[[partition]]
name = "ping"
cpus = "floating"
memory = "64M"
image = "guests:ping"
cmdline = "peer=1 chan=0 rounds=20"
doorbells = ["pong"]

[[partition]]
name = "pong"
cpus = "floating"
memory = "64M"
image = "guests:pong"
cmdline = "peer=0 chan=0"
doorbells = ["ping"]

[[channel]]
name = "link"
size = "64K"
members = { ping = "rw", pong = "rw" }
"""


def test_ping_pong_under_the_supervisor(tmp_path):
    plan = parse_plan(f'[vmm]\ncontrol_socket = "{tmp_path}/s"\n' + PLAN, tmp_path)
    sup = Supervisor(place(plan, read_topology()), log_dir=str(tmp_path / "logs"))
    hc = serve_supervisor(sup, check=True)
    try:
        sup.start_all()
        deadline = time.monotonic() + 30
        while any(e.state != STOPPED for e in sup.partitions.values()):
            assert time.monotonic() < deadline, [e.state for e in sup.partitions.values()]
            time.sleep(0.05)
    finally:
        sup.close()
        hc.close()
    ping = (tmp_path / "logs" / "ping.console.log").read_text()
    pong = (tmp_path / "logs" / "pong.console.log").read_text()
    assert re.search(r"ping: rounds=20 ns_per_round=\d+ irqs=[1-9]", ping), ping
    assert re.search(r"pong: rounds=20 irqs=[1-9]", pong), pong
    assert hc.violations == []
    assert hc.stats.calls[2] >= 41
