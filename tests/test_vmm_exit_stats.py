"""The one exit-statistics text, for ``osvmm run --stats`` and ``osvmm stat`` (no /dev/kvm)."""

from __future__ import annotations

import json

from osvmm.up.tables import format_stat
from osvmm.vmm.exit_stats import format_exit_stats

VCPUS = [{"vcpu": 0, "kvm": {"exits": 123, "io_exits": 40}, "vmm": {"IoOut": 40}}]


def test_run_stats_text():
    text = format_exit_stats(VCPUS, {0x80: 500, 0x61: 1}, {0xFEE00000: 2})
    assert text == (
        "exit statistics\n"
        "  vcpu 0: KVM exits (all, in-kernel included)\n"
        "    exits              123\n"
        "    io_exits            40\n"
        "  vcpu 0: exits the VMM handled\n"
        "    IoOut               40\n"
        "  port accesses no device claimed: 0x61x1, 0x80x500\n"
        "  MMIO accesses no device claimed (by page): 0xfee00000x2\n"
    )


def test_stat_is_the_same_table_per_partition_after_json():
    reply = json.loads(
        json.dumps(
            [
                {"name": "a", "live": True, "vcpus": VCPUS, "unclaimed_ports": {0x80: 500}},
                {"name": "b", "live": False, "vcpus": [], "unclaimed_ports": {}},
            ]
        )
    )
    body = format_exit_stats(VCPUS, {0x80: 500}).split("\n", 1)[1]
    assert format_stat(reply) == (
        "partition a (now)\n" + body + "partition b (at the end of its last run)\n  no run yet\n"
    )


def test_stat_says_the_hypercalls_made_by_call_with_the_failures_beside():
    calls = {"PARTITION_INFO": {"-ENOSPC": 1, "0": 2}, "6": {"-ENOSYS": 1}}
    reply = [{"name": "a", "live": False, "vcpus": VCPUS, "hypercalls": calls}]
    text = format_stat(json.loads(json.dumps(reply)))
    assert text.endswith("hypercalls: PARTITION_INFO 2 (-ENOSPC 1), 6 0 (-ENOSYS 1)\n")
    reply[0]["hypercalls"] = {}
    assert "hypercalls:" not in format_stat(reply)  # none made: no line
