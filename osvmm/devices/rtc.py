"""The MC146818 CMOS real-time clock and its 128 bytes of CMOS, at ports 0x70 and 0x71.

Port 0x70 selects a register (bits 6:0; bit 7, the NMI mask on a PC, is
ignored, and the port reads 0xff as under QEMU); port 0x71 reads or writes it.
Register names and bits are those of the MC146818 datasheet and Linux's
include/linux/mc146818rtc.h.

  - 0x00-0x09, seconds to year (the alarms at 0x01, 0x03, 0x05 are plain
    bytes), and the century at RTC_CENTURY (0x32, which the FADT's CENTURY
    field names): the time of an injected ``now()``, a UTC epoch time (the
    VMM passes ``time.time``), plus an offset the guest sets. They are BCD or
    binary (RTC_DM_BINARY) and 24- or 12-hour (RTC_24H, bit 7 of the hour is
    PM) as register B says when they are read. Day of week: 1 is Sunday.
  - Setting the clock: a guest write to a time register while RTC_SET is set
    in register B lands in a frozen copy (set RTC_SET freezes the copy at the
    time then); clearing RTC_SET makes that copy the time, kept as a whole
    number of seconds against ``now()``. A write with RTC_SET clear takes
    effect at once. The guest's day of week is not kept (the date implies
    it); a copy that is no date (month 0 or 13, year 0) leaves the time as it
    was. The host's clock is never changed.
  - Register A: RTC_UIP always reads 0 (no update is ever in progress: Linux's
    mc146818 code spins on it), the divider and rate bits read back what was
    written (0x26 at reset: 32.768 kHz, 1024 Hz); a divider reset does not stop
    the clock.
  - Register B: read and written as is (0x02 at reset: 24-hour, BCD).
  - Register C (interrupt flags) reads 0; register D reads RTC_VRT (the
    battery is good). Both are read-only.
  - Every other byte of the 128 is plain memory the guest reads and writes
    (e.g. 0x0f, the shutdown status), zero at reset.

No interrupt: the periodic, alarm and update-ended interrupts are never raised
and IRQ 8 stays unused, whatever PIE, AIE and UIE in register B say; a guest
that waits for one (``hwclock`` through /dev/rtc without the kernel's UIE
emulation) times out. Accesses are not locked: a guest serialises them (Linux's
rtc_lock), as it must on hardware, where the index is shared too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from osvmm.boot.acpi.pm import RTC_CENTURY

RTC_PORT = 0x70  # index (write); RTC_PORT + 1 is data
RTC_PORT_LEN = 2
RTC_IRQ = 8  # what a PC wires the RTC to: never raised here
CMOS_SIZE = 128
RTC_INDEX_MASK = 0x7F  # bit 7 of the index port is the NMI mask: ignored

RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A  # RTC_FREQ_SELECT
RTC_REG_B = 0x0B  # RTC_CONTROL
RTC_REG_C = 0x0C  # RTC_INTR_FLAGS
RTC_REG_D = 0x0D  # RTC_VALID
CMOS_SHUTDOWN_STATUS = 0x0F

RTC_UIP = 0x80  # register A: update in progress
RTC_SET = 0x80  # register B: the clock is being set, updates stop
RTC_PIE = 0x40
RTC_AIE = 0x20
RTC_UIE = 0x10
RTC_DM_BINARY = 0x04  # register B: binary, not BCD
RTC_24H = 0x02  # register B: 24-hour
RTC_VRT = 0x80  # register D: valid RAM and time (battery good)

RTC_REG_A_RESET = 0x26  # 32.768 kHz time base, 1024 Hz rate
RTC_REG_B_RESET = RTC_24H  # 24-hour, BCD

TIME_REGISTERS = (
    RTC_SECONDS,
    RTC_MINUTES,
    RTC_HOURS,
    RTC_DAY_OF_WEEK,
    RTC_DAY_OF_MONTH,
    RTC_MONTH,
    RTC_YEAR,
    RTC_CENTURY,
)


class Rtc:
    def __init__(self, now: Callable[[], float]):
        self._now = now
        self.cmos = bytearray(CMOS_SIZE)
        self.cmos[RTC_REG_A] = RTC_REG_A_RESET
        self.cmos[RTC_REG_B] = RTC_REG_B_RESET
        self.index = 0
        self.offset = 0  # seconds: the guest's time minus floor(now())

    # -- the two ports -----------------------------------------------------------------
    def read(self, offset: int) -> int:
        if offset == 0:
            return 0xFF  # the index port is write-only
        return self.read_register(self.index)

    def write(self, offset: int, value: int) -> None:
        if offset == 0:
            self.index = value & RTC_INDEX_MASK
        else:
            self.write_register(self.index, value & 0xFF)

    # -- the registers -----------------------------------------------------------------
    def read_register(self, reg: int) -> int:
        if reg in TIME_REGISTERS and not self._setting():
            return self._time_registers()[reg]
        if reg == RTC_REG_A:
            return self.cmos[RTC_REG_A] & ~RTC_UIP
        if reg == RTC_REG_C:
            return 0
        if reg == RTC_REG_D:
            return RTC_VRT
        return self.cmos[reg]

    def write_register(self, reg: int, value: int) -> None:
        if reg == RTC_REG_B:
            was_setting = self._setting()
            self.cmos[RTC_REG_B] = value
            if self._setting() and not was_setting:
                self._freeze()
            elif was_setting and not self._setting():
                self._commit()
        elif reg == RTC_REG_A:
            self.cmos[RTC_REG_A] = value & ~RTC_UIP
        elif reg in (RTC_REG_C, RTC_REG_D):
            pass  # read-only
        elif reg in TIME_REGISTERS and not self._setting():
            self._freeze()
            self.cmos[reg] = value
            self._commit()
        else:
            self.cmos[reg] = value

    # -- snapshots ---------------------------------------------------------------------
    def state(self) -> dict:
        """The CMOS bytes, the selected register and the guest's offset from the host's
        clock (so a restored guest's clock keeps the wall time, offset as it was)."""
        return {"cmos": bytes(self.cmos), "index": self.index, "offset": self.offset}

    def restore(self, state: dict) -> None:
        cmos = bytes(state["cmos"])
        if len(cmos) != CMOS_SIZE:
            raise ValueError(f"CMOS of {len(cmos)} bytes")
        self.cmos = bytearray(cmos)
        self.index = int(state["index"]) & RTC_INDEX_MASK
        self.offset = int(state["offset"])

    # -- the clock ---------------------------------------------------------------------
    def _setting(self) -> bool:
        return bool(self.cmos[RTC_REG_B] & RTC_SET)

    def guest_time(self) -> int:
        """The guest's time now: whole seconds since the epoch, UTC."""
        return math.floor(self._now()) + self.offset

    def _time_registers(self) -> dict[int, int]:
        tm = time.gmtime(self.guest_time())
        return {
            RTC_SECONDS: self._to_reg(tm.tm_sec),
            RTC_MINUTES: self._to_reg(tm.tm_min),
            RTC_HOURS: self._hour_to_reg(tm.tm_hour),
            RTC_DAY_OF_WEEK: self._to_reg((tm.tm_wday + 1) % 7 + 1),  # tm_wday 0 is Monday
            RTC_DAY_OF_MONTH: self._to_reg(tm.tm_mday),
            RTC_MONTH: self._to_reg(tm.tm_mon),
            RTC_YEAR: self._to_reg(tm.tm_year % 100),
            RTC_CENTURY: self._to_reg(tm.tm_year // 100),
        }

    def _freeze(self) -> None:
        """Copy the running time into the time registers, for the guest to change."""
        for reg, value in self._time_registers().items():
            self.cmos[reg] = value

    def _commit(self) -> None:
        """Make the time registers the guest's time, if they hold a date."""
        c = self.cmos
        year = self._from_reg(c[RTC_CENTURY]) * 100 + self._from_reg(c[RTC_YEAR])
        month = self._from_reg(c[RTC_MONTH])
        if not (1 <= month <= 12 and 1 <= year <= 9999):
            return
        import calendar  # only when the guest sets the clock (start-up time)

        seconds = calendar.timegm(
            (
                year,
                month,
                self._from_reg(c[RTC_DAY_OF_MONTH]),
                self._hour_from_reg(c[RTC_HOURS]),
                self._from_reg(c[RTC_MINUTES]),
                self._from_reg(c[RTC_SECONDS]),
            )
        )
        self.offset = seconds - math.floor(self._now())

    # -- BCD or binary, 12- or 24-hour, as register B says ------------------------------
    def _to_reg(self, value: int) -> int:
        if self.cmos[RTC_REG_B] & RTC_DM_BINARY:
            return value & 0xFF
        return ((value // 10) << 4 | value % 10) & 0xFF

    def _from_reg(self, value: int) -> int:
        if self.cmos[RTC_REG_B] & RTC_DM_BINARY:
            return value
        return (value >> 4) * 10 + (value & 0x0F)

    def _hour_to_reg(self, hour: int) -> int:
        if self.cmos[RTC_REG_B] & RTC_24H:
            return self._to_reg(hour)
        pm_bit = 0x80 if hour >= 12 else 0
        return self._to_reg(hour % 12 or 12) | pm_bit

    def _hour_from_reg(self, value: int) -> int:
        if self.cmos[RTC_REG_B] & RTC_24H:
            return self._from_reg(value)
        return self._from_reg(value & 0x7F) % 12 + (12 if value & 0x80 else 0)


def register_rtc(bus, now: Callable[[], float]) -> Rtc:
    rtc = Rtc(now)
    bus.register(RTC_PORT, RTC_PORT_LEN, rtc)
    return rtc
