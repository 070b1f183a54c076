"""The devices a built partition has on its port bus (needs /dev/kvm to build one)."""

from __future__ import annotations

import time

import pytest

from osvmm.boot.acpi import pm
from osvmm.devices.debug_exit import DEBUG_EXIT_PORT
from osvmm.devices.rtc import RTC_PORT
from osvmm.devices.serial import COM1_PORT
from osvmm.guests import resolve_image
from osvmm.machine import Machine
from osvmm.vmm.partition import Partition, PartitionConfig

pytestmark = pytest.mark.kvm

MiB = 1 << 20


@pytest.fixture
def partition():
    config = PartitionConfig(Machine(16 * MiB, [0]), image=resolve_image("guests:hello"))
    part = Partition(config).build()
    yield part
    part.close()


def test_every_platform_port_is_claimed(partition):
    pio = partition.pio
    ports = {
        "COM1": range(COM1_PORT, COM1_PORT + 8),
        "isa-debug-exit": [DEBUG_EXIT_PORT],
        "RTC index and data": [RTC_PORT, RTC_PORT + 1],
        "PM1a event": range(pm.PM1A_EVT_PORT, pm.PM1A_EVT_PORT + pm.PM1_EVT_LEN),
        "PM1a control": range(pm.PM1A_CNT_PORT, pm.PM1A_CNT_PORT + pm.PM1_CNT_LEN),
        "PM timer": range(pm.PM_TMR_PORT, pm.PM_TMR_PORT + pm.PM_TMR_LEN),
        "reset control": [pm.RESET_PORT],
    }
    for name, span in ports.items():
        assert all(pio.claimed(p) for p in span), name


def test_the_guest_sees_a_running_rtc_and_pm_timer(partition):
    """What Linux reads: register A without UIP, D with VRT, a BCD year; a PM timer
    that advances at about 3.58 MHz; a PM1 enable that reads back."""
    pio = partition.pio

    def cmos(reg: int) -> int:
        pio.write(RTC_PORT, bytes([reg]))
        return pio.read(RTC_PORT + 1, 1)[0]

    def bcd(value: int) -> int:
        return (value // 10) << 4 | value % 10

    assert not cmos(0x0A) & 0x80 and cmos(0x0D) == 0x80
    year = time.gmtime().tm_year
    century_and_year = (cmos(0x32), cmos(0x09))
    assert century_and_year in {(bcd(y // 100), bcd(y % 100)) for y in (year, year + 1)}

    def pm_timer() -> int:
        return int.from_bytes(pio.read(pm.PM_TMR_PORT, 4), "little")

    t0, c0 = time.monotonic(), pm_timer()
    time.sleep(0.05)
    ticks = (pm_timer() - c0) & pm.PM_TMR_MASK
    elapsed = time.monotonic() - t0
    assert 0.9 * 0.05 * 3_579_545 < ticks <= elapsed * 3_579_545 + 1

    enable = pm.PM1A_EVT_PORT + pm.PM1_STS_LEN
    pio.write(enable, pm.GBL_EN.to_bytes(2, "little"))
    assert pio.read(enable, 2) == pm.GBL_EN.to_bytes(2, "little")
    assert not pio.unclaimed
