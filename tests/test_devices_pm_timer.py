"""The ACPI PM timer: 24 bits at 3.579545 MHz from an injected clock, read whole with inl."""

from __future__ import annotations

from osvmm.boot.acpi import pm
from osvmm.devices.bus import PortBus
from osvmm.devices.pm_timer import PmTimer, register_pm_timer

NS = 1_000_000_000


class FakeClock:
    """A monotonic clock in nanoseconds that moves only when told, and counts its reads."""

    def __init__(self, ns: int = 5 * NS):
        self.ns = ns
        self.reads = 0

    def __call__(self) -> int:
        self.reads += 1
        return self.ns


def inl(bus: PortBus, port: int) -> int:
    return int.from_bytes(bus.read(port, 4), "little")


def test_counts_3579545_per_second_from_zero():
    clock = FakeClock()
    timer = PmTimer(clock)
    assert timer.count() == 0
    clock.ns += NS
    assert timer.count() == 3_579_545
    clock.ns += NS // 1000  # 1 ms: 3579.545 ticks, rounded down from the start
    assert timer.count() == 3_579_545 + 3_579


def ns_for_ticks(ticks: int) -> int:
    """The fewest nanoseconds after which the timer has counted ``ticks``."""
    return -(-ticks * NS // pm.PM_TMR_FREQUENCY_HZ)


def test_wraps_at_24_bits():
    clock = FakeClock()
    timer = PmTimer(clock)
    wrap = clock.ns + ns_for_ticks(1 << 24)  # about 4.687 s
    clock.ns = wrap - 1
    assert timer.count() == 0xFF_FFFF
    clock.ns = wrap
    assert timer.count() == 0
    clock.ns = wrap + NS
    assert timer.count() == 3_579_545


def test_inl_on_the_bus_is_one_sample_and_the_top_byte_is_zero():
    clock = FakeClock()
    bus = PortBus()
    register_pm_timer(bus, clock)
    assert bus.claimed(pm.PM_TMR_PORT) and bus.claimed(pm.PM_TMR_PORT + 3)
    clock.ns += 3 * NS  # 10738635 = 0xa3dbcb ticks
    reads = clock.reads
    assert bus.read(pm.PM_TMR_PORT, 4) == bytes([0xCB, 0xDB, 0xA3, 0x00])
    assert clock.reads == reads + 1  # one clock sample: the bytes cannot tear
    assert bus.read(pm.PM_TMR_PORT + 1, 1) == b"\xdb"
    assert bus.read(pm.PM_TMR_PORT + 3, 1) == b"\x00"
    bus.write(pm.PM_TMR_PORT, b"\x00\x00\x00\x00")  # read-only: ignored
    assert inl(bus, pm.PM_TMR_PORT) == 0xA3DBCB
    assert not bus.unclaimed


def test_a_carry_between_byte_reads_would_tear_but_inl_does_not():
    """The clock moves a little over one tick on every read. Four byte reads would mix
    the counts on either side of the carry from 0x00ffff to 0x010000; the inl gets one."""

    class Ticking(FakeClock):
        def __call__(self) -> int:
            value = super().__call__()
            self.ns += NS // pm.PM_TMR_FREQUENCY_HZ + 1
            return value

    clock = Ticking(0)
    bus = PortBus()
    timer = register_pm_timer(bus, clock)
    clock.ns = ns_for_ticks(0xFFFF)
    assert inl(bus, pm.PM_TMR_PORT) == 0x00FFFF
    clock.ns = ns_for_ticks(0xFFFF)
    torn = bytes(timer.read(i) for i in range(4))
    assert torn == bytes([0xFF, 0x00, 0x01, 0x00])  # what the bus's one-sample read avoids


def test_successive_reads_advance_with_the_clock():
    """As Linux's acpi_pm sanity check expects: each read advances, modulo 2**24,
    by the elapsed time at 3.579545 MHz."""
    clock = FakeClock()
    bus = PortBus()
    register_pm_timer(bus, clock)
    last = inl(bus, pm.PM_TMR_PORT)
    for step_ns in (280, 1_000, 1_000_000, 2 * NS, 4 * NS, 5 * NS):
        clock.ns += step_ns
        now = inl(bus, pm.PM_TMR_PORT)
        expected = (step_ns * pm.PM_TMR_FREQUENCY_HZ / NS) % (1 << 24)
        assert abs(((now - last) & pm.PM_TMR_MASK) - expected) <= 1
        last = now
