"""What ``osvmm plan`` accepts, ``osvmm up``'s hypercall monitor accepts too.

The plan parser checks the hypercall ABI's bounds (abi.MAX_PARTITIONS,
abi.MAX_CHANNELS, one privileged partition, every channel's slot inside the
channel window), so a plan is never refused by ``up`` after ``plan`` passed it.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osvmm.errors import ConfigError
from osvmm.hypercall import abi
from osvmm.hypercall.live import monitor_config
from osvmm.hypercall.monitor import MonitorState
from osvmm.machine import Machine
from osvmm.plan.config import parse_plan


def partitions(n: int, privileged: set[int] = frozenset()) -> str:
    return "".join(
        f'[[partition]]\nname = "p{i}"\ncpus = "floating"\nmemory = "2M"\nimage = "x"\n'
        + ("privileged = true\n" if i in privileged else "")
        for i in range(n)
    )


def channels(sizes: list[str], members: list[str]) -> str:
    return "".join(
        f'[[channel]]\nname = "c{i}"\nsize = "{size}"\nmembers = {{ {members[i]} = "rw" }}\n'
        for i, size in enumerate(sizes)
    )


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_plan(text, "/tmp")
    return str(exc.value)


def test_limits_are_the_abi_s():
    assert abi.MAX_PARTITIONS == 64 and abi.MAX_CHANNELS == 64
    parse_plan(partitions(64) + channels(["4K"] * 64, ["p0"] * 64), "/tmp")


def test_too_many_partitions():
    assert error_of(partitions(65)) == (
        "partition: 65 partitions, at most 64 (the hypercall ABI numbers them in a 64-bit "
        "doorbell mask)"
    )
    assert "1000 partitions, at most 64" in error_of(partitions(1000))


def test_too_many_channels():
    assert "channel: 65 channels, at most 64" in error_of(
        partitions(1) + channels(["4K"] * 65, ["p0"] * 65)
    )


def test_two_privileged_partitions():
    assert error_of(partitions(3, {0, 2})) == (
        "partition 'p2': privileged: 'p0' is privileged already (at most one partition is)"
    )


def test_channels_of_disjoint_members_still_share_the_window():
    # Each partition's own channels fit 256M, all of them together do not: every channel
    # has its own slot, the same in every member, packed in id order.
    text = partitions(5) + channels(["64M"] * 5, [f"p{i}" for i in range(5)])
    assert error_of(text) == (
        "channel: 320M of channels do not fit the 256M channel window (each channel has its "
        "own slot in it, the same in every member)"
    )


def monitor_accepts(plan) -> None:
    machines = {
        p.name: Machine.build(p.memory, p.vcpus, 1, channels=bool(plan.channels_of(p.name)))
        for p in plan.partitions
    }
    MonitorState.from_config(monitor_config(plan, machines))


@st.composite
def plans(draw):
    n = draw(st.integers(1, abi.MAX_PARTITIONS + 3))
    privileged = draw(st.sets(st.integers(0, n - 1), max_size=3))
    m = draw(st.integers(0, abi.MAX_CHANNELS + 3))
    sizes = draw(st.lists(st.sampled_from(["4K", "1M", "16M", "64M"]), min_size=m, max_size=m))
    members = draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m))
    return partitions(n, privileged) + channels(sizes, [f"p{i}" for i in members])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_a_plan_the_parser_accepts_the_monitor_accepts(text):
    try:
        plan = parse_plan(text, "/tmp")
    except ConfigError:
        return
    monitor_accepts(plan)
