"""The CMOS RTC at 0x70/0x71: time from a fixed clock in BCD or binary, 12- or 24-hour,
the century, a guest-set time, registers A-D, and the rest of CMOS as plain bytes.

Epoch times are from `date -u -d ... +%s`, not from the code under test.
"""

from __future__ import annotations

import pytest

from osvmm.boot.acpi import build_acpi, pm
from osvmm.devices.bus import PortBus
from osvmm.devices.rtc import (
    CMOS_SHUTDOWN_STATUS,
    RTC_DM_BINARY,
    RTC_PORT,
    RTC_SET,
    RTC_UIP,
    RTC_VRT,
    register_rtc,
)
from osvmm.machine import Machine

SAT_2026_03_14_150926 = 1773500966  # Saturday
FRI_1999_12_31_235958 = 946684798  # Friday
FRI_2031_07_04_003005 = 1940891405  # Friday

SEC, MIN, HOUR, WDAY, MDAY, MON, YEAR, CENTURY = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def cmos(t: float):
    clock = Clock(t)
    bus = PortBus()
    register_rtc(bus, clock)
    return bus, clock


def rd(bus: PortBus, reg: int, nmi_off: bool = False) -> int:
    bus.write(RTC_PORT, bytes([reg | (0x80 if nmi_off else 0)]))
    return bus.read(RTC_PORT + 1, 1)[0]


def wr(bus: PortBus, reg: int, value: int) -> None:
    bus.write(RTC_PORT, bytes([reg]))
    bus.write(RTC_PORT + 1, bytes([value]))


def clock_regs(bus: PortBus) -> list[int]:
    return [rd(bus, r) for r in (SEC, MIN, HOUR, WDAY, MDAY, MON, YEAR, CENTURY)]


def test_ports_are_claimed_and_reset_registers():
    bus, _ = cmos(SAT_2026_03_14_150926)
    assert bus.claimed(0x70) and bus.claimed(0x71) and not bus.claimed(0x72)
    assert (rd(bus, REG_A), rd(bus, REG_B), rd(bus, REG_C), rd(bus, REG_D)) == (
        0x26,
        0x02,
        0x00,
        0x80,
    )
    assert bus.read(RTC_PORT, 1) == b"\xff"  # the index port is write-only
    assert not bus.unclaimed


def test_bcd_24h_default_with_century_and_sunday_first_day_of_week():
    bus, _ = cmos(SAT_2026_03_14_150926 + 0.75)  # the fraction does not round up
    # 15:09:26, Saturday = 7, 14 March, (20)26: BCD.
    assert clock_regs(bus) == [0x26, 0x09, 0x15, 0x07, 0x14, 0x03, 0x26, 0x20]


def test_binary_mode():
    bus, _ = cmos(SAT_2026_03_14_150926)
    wr(bus, REG_B, 0x02 | RTC_DM_BINARY)
    assert rd(bus, REG_B) == 0x06
    assert clock_regs(bus) == [26, 9, 15, 7, 14, 3, 26, 20]


@pytest.mark.parametrize(
    ("t", "binary", "hour"),
    [
        (SAT_2026_03_14_150926, False, 0x80 | 0x03),  # 3 PM
        (FRI_2031_07_04_003005, False, 0x12),  # 00:30 is 12 AM
        (FRI_2031_07_04_003005 + 12 * 3600, False, 0x80 | 0x12),  # 12:30 is 12 PM
        (FRI_2031_07_04_003005 + 11 * 3600, True, 11),  # 11:30 AM, binary
        (FRI_2031_07_04_003005 + 23 * 3600, True, 0x80 | 11),  # 11:30 PM, binary
    ],
)
def test_12_hour_mode(t, binary, hour):
    bus, _ = cmos(t)
    wr(bus, REG_B, RTC_DM_BINARY if binary else 0)  # RTC_24H clear
    assert rd(bus, HOUR) == hour


def test_time_runs_with_the_clock_across_a_century():
    bus, clock = cmos(FRI_1999_12_31_235958)
    assert clock_regs(bus) == [0x58, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]
    clock.t += 2
    assert clock_regs(bus) == [0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]


def test_uip_never_reads_set_and_the_divider_bits_are_writable():
    bus, _ = cmos(SAT_2026_03_14_150926)
    for _ in range(1000):
        assert not rd(bus, REG_A) & RTC_UIP
    wr(bus, REG_A, 0xFF)
    assert rd(bus, REG_A) == 0x7F
    wr(bus, REG_A, 0x26)
    assert rd(bus, REG_A) == 0x26


def test_registers_c_and_d_are_read_only():
    bus, _ = cmos(SAT_2026_03_14_150926)
    wr(bus, REG_C, 0xF0)
    wr(bus, REG_D, 0x00)
    assert (rd(bus, REG_C), rd(bus, REG_D)) == (0, RTC_VRT)


def test_guest_sets_the_time_as_linux_does():
    """mc146818_set_time: B |= SET, the time registers, B &= ~SET. The set time then
    runs on with the host clock; the host clock is not changed."""
    bus, clock = cmos(SAT_2026_03_14_150926)
    b = rd(bus, REG_B)
    wr(bus, REG_B, b | RTC_SET)
    frozen = clock_regs(bus)
    clock.t += 5
    assert clock_regs(bus) == frozen  # frozen while SET
    for reg, value in [(SEC, 0x05), (MIN, 0x30), (HOUR, 0x00), (MDAY, 0x04), (MON, 0x07)]:
        wr(bus, reg, value)
    wr(bus, YEAR, 0x31)
    wr(bus, CENTURY, 0x20)
    assert rd(bus, SEC) == 0x05  # what was written, until SET is cleared
    wr(bus, REG_B, b)
    assert clock_regs(bus) == [0x05, 0x30, 0x00, 0x06, 0x04, 0x07, 0x31, 0x20]
    clock.t += 3600 + 0.9
    assert clock_regs(bus)[:3] == [0x05, 0x30, 0x01]
    assert clock.t == SAT_2026_03_14_150926 + 5 + 3600 + 0.9


def test_guest_set_time_in_binary_12_hour_mode():
    bus, _ = cmos(SAT_2026_03_14_150926)
    mode = RTC_DM_BINARY  # binary, 12-hour
    wr(bus, REG_B, mode | RTC_SET)
    for reg, value in [(SEC, 5), (MIN, 30), (HOUR, 12), (MDAY, 4), (MON, 7), (YEAR, 31)]:
        wr(bus, reg, value)  # 12 AM: 00:30:05
    wr(bus, CENTURY, 20)
    wr(bus, REG_B, mode)
    wr(bus, REG_B, 0x02)  # back to 24-hour BCD to read it
    assert clock_regs(bus) == [0x05, 0x30, 0x00, 0x06, 0x04, 0x07, 0x31, 0x20]


def test_a_write_with_set_clear_takes_effect_at_once():
    bus, clock = cmos(SAT_2026_03_14_150926)
    wr(bus, YEAR, 0x31)
    assert clock_regs(bus) == [0x26, 0x09, 0x15, 0x06, 0x14, 0x03, 0x31, 0x20]  # a Friday
    clock.t += 60
    assert rd(bus, MIN) == 0x10


def test_a_written_time_that_is_no_date_leaves_the_time_alone():
    bus, _ = cmos(SAT_2026_03_14_150926)
    wr(bus, REG_B, 0x02 | RTC_SET)
    wr(bus, MON, 0x13)
    wr(bus, REG_B, 0x02)
    assert clock_regs(bus) == [0x26, 0x09, 0x15, 0x07, 0x14, 0x03, 0x26, 0x20]


def test_the_rest_of_cmos_is_plain_bytes_and_the_nmi_bit_is_ignored():
    bus, _ = cmos(SAT_2026_03_14_150926)
    assert rd(bus, CMOS_SHUTDOWN_STATUS) == 0
    wr(bus, CMOS_SHUTDOWN_STATUS, 0x0A)
    assert rd(bus, CMOS_SHUTDOWN_STATUS, nmi_off=True) == 0x0A
    for reg in (0x01, 0x03, 0x05, 0x0E, 0x10, 0x31, 0x33, 0x7F):  # alarms, the rest
        wr(bus, reg, reg ^ 0x5A)
    for reg in (0x01, 0x03, 0x05, 0x0E, 0x10, 0x31, 0x33, 0x7F):
        assert rd(bus, reg) == reg ^ 0x5A
    assert rd(bus, SEC | 0x80) == 0x26  # index 0x80 is 0x00 with NMI masked


def test_the_fadt_century_field_names_the_century_register():
    (_, fadt) = build_acpi(Machine(256 << 20, [0])).tables["FACP"]
    assert fadt[108] == pm.RTC_CENTURY == CENTURY
