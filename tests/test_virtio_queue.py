"""The split virtqueue against guest memory the test lays out: chains, indirect
tables, wrap-around of the rings' 16-bit indices, event idx, and every kind of
malformed chain refused with QueueError (never a hang, never a read outside RAM)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osvmm.devices.virtio import spec
from osvmm.devices.virtio.queue import QueueError, Virtqueue
from tests.virtio_driver import AVAIL, DESC, INDIRECT, MEM_SIZE, USED, Driver, memory

F = spec


@pytest.fixture
def mem():
    m = memory()
    yield m
    m.close()


def queue(mem, size=8, **kw) -> Virtqueue:
    return Virtqueue(mem, size, DESC, AVAIL, USED, **kw)


def test_a_chain_of_readable_then_writable_buffers(mem):
    d, q = Driver(mem), queue(mem)
    a, b, c = d.buffer(b"head"), d.buffer(b"body!"), d.buffer(8)
    d.make_available(d.chain([(a, 4, False), (b, 5, False), (c, 8, True)], first=3))
    chain = q.pop()
    assert chain.head == 3
    assert chain.readable == [(a, 4), (b, 5)] and chain.writable == [(c, 8)]
    assert chain.read(mem, 2, 5) == b"adbod"
    assert chain.write(mem, 6, b"xyz") == 2  # only 8 writable bytes
    assert mem.read(c + 6, 2) == b"xy"
    assert q.pop() is None
    q.push(3, 8)
    assert d.take_used() == [(3, 8)]
    assert q.needs_interrupt()
    assert not q.needs_interrupt()  # nothing pushed since


def test_views_cover_exactly_the_range_asked(mem):
    d, q = Driver(mem), queue(mem)
    a, b = d.buffer(b"0123"), d.buffer(b"456789")
    d.make_available(d.chain([(a, 4, False), (b, 6, False)]))
    views = q.pop().readable_views(mem, 2, 5)
    assert [bytes(v) for v in views] == [b"23", b"456"]


def test_indirect_table(mem):
    d, q = Driver(mem), queue(mem, indirect=True)
    a, b = d.buffer(b"req"), d.buffer(4)
    d.chain([(a, 3, False), (b, 4, True)], table=INDIRECT)
    d.set_desc(5, INDIRECT, 32, F.VIRTQ_DESC_F_INDIRECT)
    d.make_available(5)
    chain = q.pop()
    assert chain.head == 5 and chain.readable == [(a, 3)] and chain.writable == [(b, 4)]


def test_indirect_refused_without_the_feature(mem):
    d, q = Driver(mem), queue(mem, indirect=False)
    d.chain([(d.buffer(4), 4, False)], table=INDIRECT)
    d.set_desc(0, INDIRECT, 16, F.VIRTQ_DESC_F_INDIRECT)
    d.make_available(0)
    with pytest.raises(QueueError, match="INDIRECT_DESC"):
        q.pop()


@pytest.mark.parametrize(
    ("length", "flags", "inner", "match"),
    [
        (0, 0, None, "indirect table of 0 bytes"),
        (24, 0, None, "indirect table of 24 bytes"),
        (32, F.VIRTQ_DESC_F_NEXT, None, "with VIRTQ_DESC_F_NEXT"),
        (32, 0, F.VIRTQ_DESC_F_INDIRECT, "inside an indirect table"),
        (32, 0, F.VIRTQ_DESC_F_NEXT, "longer than its table"),  # entry 0 -> 0 -> ...
        (16 * 40000, 0, None, "indirect table of 40000"),
    ],
)
def test_malformed_indirect_tables(mem, length, flags, inner, match):
    d, q = Driver(mem), queue(mem, indirect=True)
    buf = d.buffer(16)
    d.set_desc(0, buf, 16, inner or 0, 0, table=INDIRECT)
    if inner == F.VIRTQ_DESC_F_INDIRECT:
        d.set_desc(0, INDIRECT, 16, inner, 0, table=INDIRECT)
    d.set_desc(0, INDIRECT, length, F.VIRTQ_DESC_F_INDIRECT | flags, 1)
    d.make_available(0)
    with pytest.raises(QueueError, match=match):
        q.pop()


def test_indirect_table_outside_ram(mem):
    d, q = Driver(mem), queue(mem, indirect=True)
    d.set_desc(0, MEM_SIZE - 16, 32, F.VIRTQ_DESC_F_INDIRECT)
    d.make_available(0)
    with pytest.raises(QueueError, match="not in guest RAM"):
        q.pop()


def test_a_loop_ends_at_the_queue_size(mem):
    d, q = Driver(mem), queue(mem)
    buf = d.buffer(16)
    d.set_desc(0, buf, 16, F.VIRTQ_DESC_F_NEXT, 1)
    d.set_desc(1, buf, 16, F.VIRTQ_DESC_F_NEXT, 0)
    d.make_available(0)
    with pytest.raises(QueueError, match="a loop"):
        q.pop()


def test_a_chain_of_exactly_the_queue_size_is_fine(mem):
    d, q = Driver(mem), queue(mem, size=4)
    buf = d.buffer(16)
    d.chain([(buf, 1, False)] * 4)
    d.make_available(0)
    assert len(q.pop().readable) == 4


@pytest.mark.parametrize(
    ("addr", "length"),
    [(MEM_SIZE - 8, 16), (MEM_SIZE, 1), (1 << 40, 16), ((1 << 64) - 8, 16), (0, 0xFFFFFFFF)],
)
def test_buffers_outside_ram_are_refused(mem, addr, length):
    d, q = Driver(mem), queue(mem)
    d.set_desc(0, addr, length, 0)
    d.make_available(0)
    with pytest.raises(QueueError, match="not in guest RAM"):
        q.pop()


def test_readable_after_writable_is_refused(mem):
    d, q = Driver(mem), queue(mem)
    a, b = d.buffer(4), d.buffer(4)
    d.make_available(d.chain([(a, 4, True), (b, 4, False)]))
    with pytest.raises(QueueError, match="readable buffer after a device-writable"):
        q.pop()


def test_head_and_next_outside_the_table(mem):
    d, q = Driver(mem), queue(mem)
    d.make_available(8)
    with pytest.raises(QueueError, match="head 8"):
        q.pop()
    d2, q2 = Driver(mem), queue(mem)
    d2.set_desc(0, d2.buffer(4), 4, F.VIRTQ_DESC_F_NEXT, 9)
    d2.avail_idx = 0
    d2.make_available(0)
    with pytest.raises(QueueError, match="next descriptor 9"):
        q2.pop()


def test_avail_index_running_ahead_is_refused(mem):
    q = queue(mem)
    mem.write(AVAIL + 2, struct.pack("<H", 9))  # 9 entries in a queue of 8
    with pytest.raises(QueueError, match="more than the queue size"):
        q.pop()


@pytest.mark.parametrize(
    ("size", "desc", "avail", "used", "match"),
    [
        (6, DESC, AVAIL, USED, "power of two"),
        (0, DESC, AVAIL, USED, "power of two"),
        (65536, DESC, AVAIL, USED, "power of two"),
        (8, DESC + 8, AVAIL, USED, "descriptor table .* aligned"),
        (8, DESC, AVAIL + 1, USED, "available ring .* aligned"),
        (8, DESC, AVAIL, USED + 2, "used ring .* aligned"),
        (8, MEM_SIZE - 64, AVAIL, USED, "descriptor table .* not in guest RAM"),
        (8, DESC, 1 << 50, USED, "available ring .* not in guest RAM"),
        (8, DESC, AVAIL, MEM_SIZE - 32, "used ring .* not in guest RAM"),
    ],
)
def test_rings_must_be_in_ram_and_aligned(mem, size, desc, avail, used, match):
    with pytest.raises(QueueError, match=match):
        Virtqueue(mem, size, desc, avail, used)


def test_indices_wrap_around_at_65536(mem):
    d, q = Driver(mem, size=4), queue(mem, size=4)
    start = 0xFFFE
    q.last_avail = q.used_idx = q.signalled_used = start
    d.avail_idx = d.used_seen = start
    mem.write(USED + 2, struct.pack("<H", start))
    buf = d.buffer(4)
    for round_ in range(6):  # across 0xffff -> 0
        d.set_desc(round_ % 4, buf, 4, F.VIRTQ_DESC_F_WRITE)
        d.make_available(round_ % 4)
        chain = q.pop()
        assert chain.head == round_ % 4
        q.push(chain.head, round_)
        assert d.take_used() == [(round_ % 4, round_)]
    assert q.last_avail == (start + 6) & 0xFFFF == 4
    assert d.used_idx() == 4


def test_no_interrupt_flag_without_event_idx(mem):
    d, q = Driver(mem), queue(mem)
    d.set_avail_flags(F.VIRTQ_AVAIL_F_NO_INTERRUPT)
    d.make_available(d.chain([(d.buffer(1), 1, True)]))
    q.push(q.pop().head, 1)
    assert not q.needs_interrupt()


def test_event_idx_interrupts_only_when_used_event_is_crossed(mem):
    d, q = Driver(mem), queue(mem, event_idx=True)
    buf = d.buffer(4)
    d.set_used_event(1)  # interrupt when the used index goes past 1
    for i in range(3):
        d.set_desc(i, buf, 4, F.VIRTQ_DESC_F_WRITE)
        d.make_available(i)
    answers = []
    for _ in range(3):
        q.push(q.pop().head, 4)
        answers.append(q.needs_interrupt())
    assert answers == [False, True, False]
    assert q.pop() is None
    assert d.avail_event() == 3  # the device asks to be notified at the next chain


def test_indices_say_where_driver_and_device_stand(mem):
    d, q = Driver(mem), queue(mem, event_idx=True)
    buf = d.buffer(4)
    d.set_used_event(7)
    for i in range(3):
        d.set_desc(i, buf, 4, F.VIRTQ_DESC_F_WRITE)
        d.make_available(i)
    q.push(q.pop().head, 4)
    q.needs_interrupt()
    q.pop()
    assert q.indices() == {
        "size": 8,
        "avail_idx": 3,
        "last_avail": 2,
        "used_idx": 1,
        "signalled_used": 1,
        "used_event": 7,
        "avail_event": 0,  # written only when the device finds the ring empty
    }
    plain = queue(mem)
    assert set(plain.indices()) == {"size", "avail_idx", "last_avail", "used_idx", "signalled_used"}


def test_event_idx_looks_again_after_publishing_avail_event(mem):
    """A chain made available between the empty check and avail_event is not missed."""
    d, q = Driver(mem), queue(mem, event_idx=True)
    buf = d.buffer(4)
    d.set_desc(0, buf, 4, F.VIRTQ_DESC_F_WRITE)
    real_write = mem.write

    def write(gpa, data):
        real_write(gpa, data)
        if gpa == USED + 4 + 8 * 8 and d.avail_idx == 0:
            d.make_available(0)  # the driver, right after the device's first look

    mem.write = write
    try:
        assert q.pop().head == 0
    finally:
        mem.write = real_write


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    table=st.lists(
        st.tuples(
            st.integers(0, MEM_SIZE + 64),
            st.integers(0, 0x2000),
            st.integers(0, 7),
            st.integers(0, 10),
        ),
        min_size=8,
        max_size=8,
    ),
    indirect=st.lists(
        st.tuples(
            st.integers(0, MEM_SIZE), st.integers(0, 64), st.integers(0, 7), st.integers(0, 5)
        ),
        min_size=4,
        max_size=4,
    ),
    heads=st.lists(st.integers(0, 9), min_size=1, max_size=12),
    avail_idx=st.integers(0, 0xFFFF),
)
def test_any_descriptor_table_gives_a_chain_or_a_queue_error(
    mem, table, indirect, heads, avail_idx
):
    """Whatever the guest writes: pop returns a chain whose every buffer is inside
    guest RAM, readable ones first, at most the queue size long; or QueueError."""
    d = Driver(mem)
    for i, (addr, length, flags, nxt) in enumerate(table):
        if flags & F.VIRTQ_DESC_F_INDIRECT:
            addr = INDIRECT
        d.set_desc(i, addr, length, flags, nxt)
    for i, (addr, length, flags, nxt) in enumerate(indirect):
        d.set_desc(i, addr, length, flags, nxt, table=INDIRECT)
    for h in heads:
        d.make_available(h)
    mem.write(AVAIL + 2, struct.pack("<H", avail_idx))
    q = queue(mem, indirect=True, event_idx=True)
    for _ in range(len(heads) + 1):
        try:
            chain = q.pop()
        except QueueError:
            return
        if chain is None:
            return
        assert len(chain.readable) + len(chain.writable) <= 8 + 4  # direct, indirect
        for addr, length in chain.readable + chain.writable:
            assert 0 <= addr and addr + length <= MEM_SIZE
        q.push(chain.head, 0)
