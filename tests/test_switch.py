"""The learning switch's model (devices/switch.py): learning, unicast, flooding,
drops, table bound and ageing; a property that no frame reaches its ingress
port or a port of another switch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osvmm.devices.switch import Switch

A, B, C = (bytes([0x02, 0, 0, 0, 0, n]) for n in (1, 2, 3))
BCAST = b"\xff" * 6
MCAST = bytes.fromhex("01005e000001")


def frame(dst: bytes, src: bytes, size: int = 60) -> bytes:
    return dst + src + b"\x08\x00" + bytes(size - 14)


def three() -> Switch:
    sw = Switch("lan")
    for _ in range(3):
        sw.add_port()
    return sw


def test_unknown_unicast_floods_then_learned_goes_to_one_port():
    sw = three()
    assert sw.forward(0, frame(B, A), 0.0) == [1, 2]
    assert sw.forward(1, frame(A, B), 0.0) == [0]  # A learned on port 0
    assert sw.forward(0, frame(B, A), 0.0) == [1]  # B learned on port 1
    assert sw.ports[0].counts == {"rx": 2, "tx": 1, "dropped": 0, "flooded": 1}
    assert sw.ports[1].counts["tx"] == 2 and sw.ports[2].counts["tx"] == 1


def test_broadcast_and_multicast_flood_never_back():
    sw = three()
    sw.forward(1, frame(A, B), 0.0)
    assert sw.forward(0, frame(BCAST, A), 0.0) == [1, 2]
    assert sw.forward(2, frame(MCAST, C), 0.0) == [0, 1]


def test_group_source_is_not_learned():
    sw = three()
    sw.forward(0, frame(B, BCAST), 0.0)
    assert sw.table == {}


def test_destination_on_the_ingress_port_goes_nowhere():
    sw = three()
    sw.forward(0, frame(BCAST, A), 0.0)
    assert sw.forward(0, frame(A, C), 0.0) == []


def test_a_station_that_moves_is_relearned():
    sw = three()
    sw.forward(0, frame(BCAST, A), 0.0)
    sw.forward(2, frame(BCAST, A), 1.0)
    assert sw.forward(1, frame(A, B), 1.0) == [2]


@pytest.mark.parametrize("size", [0, 13, 1515, 9000])
def test_short_and_long_frames_are_dropped_and_counted(size):
    sw = three()
    assert sw.forward(0, bytes(size), 0.0) == []
    assert sw.ports[0].counts["dropped"] == 1 and sw.ports[0].counts["rx"] == 0
    assert sw.table == {}


def test_header_only_and_max_frames_pass():
    sw = three()
    assert sw.forward(0, frame(BCAST, A, 14), 0.0) == [1, 2]
    assert sw.forward(0, frame(BCAST, A, 1514), 0.0) == [1, 2]


def test_table_is_bounded_least_recently_seen_evicted():
    sw = Switch(table_size=2)
    for _ in range(3):
        sw.add_port()
    sw.forward(0, frame(BCAST, A), 0.0)
    sw.forward(1, frame(BCAST, B), 1.0)
    sw.forward(0, frame(BCAST, A), 2.0)  # A seen again: B is now the oldest
    sw.forward(2, frame(BCAST, C), 3.0)
    assert list(sw.table) == [A, C] and sw.evicted == 1
    assert sw.forward(0, frame(B, A), 3.0) == [1, 2]  # B forgotten: flooded


def test_entries_age_out():
    sw = Switch(ageing=10.0)
    for _ in range(3):
        sw.add_port()
    sw.forward(1, frame(BCAST, B), 0.0)
    assert sw.forward(0, frame(B, A), 10.0) == [1]
    assert sw.forward(0, frame(B, A), 10.5) == [1, 2]
    assert B not in sw.table


def test_unknown_port_is_refused():
    with pytest.raises(ValueError):
        three().forward(3, frame(BCAST, A), 0.0)


macs = st.sampled_from([A, B, C, BCAST, MCAST, bytes.fromhex("020000000009")])
sends = st.lists(
    st.tuples(
        st.integers(0, 1),  # which switch
        st.integers(0, 3),  # which of its ports
        macs,
        macs,
        st.integers(0, 1600),
        st.floats(0, 1000),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(sends, st.integers(1, 4))
def test_frames_stay_on_their_switch_and_never_return(sends, table_size):
    switches = [Switch(str(i), table_size=table_size, ageing=50.0) for i in range(2)]
    owner = {}
    for sw in switches:
        for _ in range(4):
            owner[id(sw), sw.add_port()] = sw
    now = 0.0
    for which, ingress, dst, src, size, dt in sends:
        now += dt
        sw = switches[which]
        data = (dst + src + b"\x08\x00" + bytes(max(size, 14)))[:size]
        out = sw.forward(ingress, data, now)
        assert ingress not in out
        assert len(out) == len(set(out))
        assert all((id(sw), p) in owner for p in out)
        assert all(0 <= p < len(sw.ports) for p in out)
        if not 14 <= size <= sw.max_frame:
            assert out == []
        assert len(sw.table) <= table_size
