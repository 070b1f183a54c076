"""The hypercall topology changed at run time (``osvmm create``, ``osvmm destroy``):
``extend_topology`` adds partitions and channels without moving what runs,
``withdraw_partition`` retires one; the six calls on the result, and the spec's
tables (``config_of``) agree with them."""

from __future__ import annotations

import pytest

from osvmm.arch.x86 import layout
from osvmm.errors import ConfigError
from osvmm.hypercall import abi
from osvmm.hypercall.abi import EBUSY, EINVAL, EPERM
from osvmm.hypercall.monitor import (
    RUNNING,
    STOPPED,
    Attachment,
    ChannelConfig,
    MonitorConfig,
    MonitorState,
    PartitionConfig,
    config_of,
    extend_topology,
    partition_info_bytes,
    step,
    withdraw_partition,
)
from osvmm.hypercall.spec import Spec

RAM = ((0, 16 << 20),)


def base() -> MonitorState:
    config = MonitorConfig(
        [PartitionConfig("a", RAM, doorbells=("b",)), PartitionConfig("b", RAM)],
        [ChannelConfig("ab", 0x10000, {"a": "rw", "b": "ro"})],
    )
    return MonitorState.from_config(config)


def grown(state: MonitorState) -> MonitorState:
    topo = extend_topology(
        state.topology,
        [
            PartitionConfig("ping", RAM, doorbells=("pong", "a")),
            PartitionConfig("pong", RAM, doorbells=("ping",)),
        ],
        [
            ChannelConfig("link", 0x10000, {"ping": "rw", "pong": "rw"}),
            ChannelConfig("spare", 0x1000, {"a": "rw", "b": "rw"}),
        ],
        {"a": 0, "b": 1},
    )
    return MonitorState(topo, state.lifecycle + (RUNNING, RUNNING), state.attachments)


def test_extend_keeps_ids_slots_and_attachments_and_packs_the_new_slots():
    s = base()
    s = step(s, 1, abi.CHANNEL_ATTACH, (0, 0)).state  # b holds "ab" while the VMM grows
    g = grown(s)
    assert [p.name for p in g.topology.partitions] == ["a", "b", "ping", "pong"]
    assert g.topology.partitions[:2] == s.topology.partitions  # the same objects
    assert g.topology.partitions[2].doorbells == {3, 0}
    link, spare = g.topology.channels[1:]
    assert (link.id, link.gpa, link.members) == (
        1,
        layout.CHANNEL_WINDOW_START + 0x10000,
        {2: True, 3: True},
    )
    assert (spare.id, spare.gpa) == (2, link.gpa + 0x10000)
    assert g.attachments == {Attachment(1, 0, False)}
    # a running partition sees the new channel at once and may attach it
    r = step(g, 0, abi.CHANNEL_ATTACH, (2, 0))
    assert r.result == spare.gpa
    assert step(g, 2, abi.DOORBELL, (3, 0, 0x40)).result == 0
    assert step(g, 2, abi.DOORBELL, (0, 0, 0x40)).result == 0
    assert step(g, 0, abi.DOORBELL, (2, 0, 0x40)).result == -EPERM  # no grant to a new one


@pytest.mark.parametrize(
    "parts, chans, error",
    [
        ([PartitionConfig("a", RAM)], [], "partition 'a' exists already"),
        ([PartitionConfig("x", RAM, doorbells=("zz",))], [], "doorbell to unknown partition 'zz'"),
        ([PartitionConfig("x", RAM, privileged=True)], [], "is not privileged"),
        ([], [ChannelConfig("ab", 0x1000, {"a": "rw"})], "channel 'ab' exists already"),
        ([], [ChannelConfig("c", 0x1000, {"zz": "rw"})], "unknown member 'zz'"),
        ([], [ChannelConfig("c", 0x1000, {})], "no members"),
        ([], [ChannelConfig("c", 0x1800, {"a": "rw"})], "not a multiple of 4 KiB"),
        ([], [ChannelConfig("c", layout.CHANNEL_WINDOW_SIZE, {"a": "rw"})], "do not fit"),
        ([PartitionConfig(f"p{i}", RAM) for i in range(63)], [], "hypercall ids"),
    ],
)
def test_extend_refuses_what_does_not_fit(parts, chans, error):
    with pytest.raises(ConfigError, match=error.replace("(", r"\(")):
        extend_topology(base().topology, parts, chans, {"a": 0, "b": 1})


def test_withdraw_retires_grants_and_channels_and_keeps_ids():
    g = grown(base())
    g = step(g, 3, abi.CHANNEL_ATTACH, (1, 0)).state  # pong holds "link"
    topo, gone = withdraw_partition(g.topology, 2)  # ping is destroyed
    assert gone == (1,)
    assert [c.members for c in topo.channels] == [{0: True, 1: False}, {}, {0: True, 1: True}]
    assert topo.partitions[2].doorbells == frozenset() and topo.partitions[3].doorbells == set()
    assert [c.gpa for c in topo.channels] == [c.gpa for c in g.topology.channels]
    lifecycle = list(g.lifecycle)
    lifecycle[2] = STOPPED
    held = frozenset(a for a in g.attachments if a.channel not in gone)
    s = MonitorState(topo, tuple(lifecycle), held)
    assert step(s, 3, abi.DOORBELL, (2, 0, 0x40)).result == -EPERM  # ping: gone
    assert step(s, 3, abi.CHANNEL_ATTACH, (1, 0)).result == -EPERM  # link: withdrawn
    assert step(s, 3, abi.CHANNEL_DETACH, (1,)).result == -EINVAL
    info = partition_info_bytes(s, 3)
    count, mask = abi.PARTITION_INFO_HEADER.unpack_from(info)[6:8]
    assert (count, mask) == (0, 1 << 3)  # no channel, only itself to ring
    # before the withdrawal, a stopped partition's doorbell answers -EBUSY
    before = MonitorState(g.topology, tuple(lifecycle), g.attachments)
    assert step(before, 3, abi.DOORBELL, (2, 0, 0x40)).result == -EBUSY


def test_the_spec_tables_follow_a_topology_changed_at_run_time():
    g = grown(base())
    topo, _ = withdraw_partition(g.topology, 2)
    s = MonitorState(topo, g.lifecycle[:2] + (STOPPED, RUNNING), frozenset())
    spec = Spec(config_of(topo))
    calls = [
        (3, abi.DOORBELL, (2, 0, 0x40, 0)),
        (3, abi.CHANNEL_ATTACH, (1, 0, 0, 0)),
        (0, abi.CHANNEL_ATTACH, (2, 0, 0, 0)),
        (0, abi.DOORBELL, (1, 0, 0x40, 0)),
        (3, abi.PARTITION_INFO, (0x1000, 4096, 0, 0)),
    ]
    for caller, nr, args in calls:
        want = spec.outcome(s.lifecycle, s.attachments, caller, nr, args)
        got = step(s, caller, nr, args)
        assert got.result == want.result, (caller, nr, args)


def test_a_grant_lets_a_running_partition_ring_another_and_only_adds():
    s = base()
    s = step(s, 1, abi.CHANNEL_ATTACH, (0, 0)).state
    topo = extend_topology(
        s.topology, [PartitionConfig("new", RAM)], [], {"a": 0, "b": 1}, [("b", "new"), ("b", "a")]
    )
    g = MonitorState(topo, s.lifecycle + (RUNNING,), s.attachments)
    assert topo.partitions[1].doorbells == {2, 0} and topo.partitions[0].doorbells == {1}
    assert step(g, 1, abi.DOORBELL, (2, 0, 0x40)).result == 0
    assert step(g, 1, abi.DOORBELL, (0, 0, 0x40)).result == 0
    assert g.attachments == {Attachment(1, 0, False)}  # what it holds is unchanged
    mask = abi.PARTITION_INFO_HEADER.unpack_from(partition_info_bytes(g, 1))[7]
    assert mask == 0b111
    with pytest.raises(ConfigError, match="partition 'a' may ring 'b' already"):
        extend_topology(s.topology, [], [], {"a": 0, "b": 1}, [("a", "b")])
    with pytest.raises(ConfigError, match="no partition 'zz'"):
        extend_topology(s.topology, [], [], {"a": 0, "b": 1}, [("zz", "b")])
