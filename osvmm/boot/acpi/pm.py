"""The ACPI fixed-hardware ports the partition's FADT and DSDT announce.

The VMM's device model imports these and traps the guest's port I/O there;
nothing else about power management is emulated.

Power-off. Linux's ``acpi_power_off`` (ACPICA ``acpi_hw_legacy_sleep``) first
clears PM1 status by writing ones to the 16-bit PM1 status register at
PM1A_EVT_PORT, then writes PM1A_CNT_PORT twice with SLP_TYP = S5_SLP_TYP (the
first element of ``\\_S5_`` in the DSDT): once without SLP_EN, once with it.
The partition is off when a write to PM1A_CNT_PORT has SLP_EN set and
``(value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLP_TYP``.

Reset. Linux's default reboot method on x86 is ACPI: it writes RESET_VALUE
(one byte) to RESET_PORT, the FADT's RESET_REG (port 0xcf9 "reset control"
as on PIIX/ICH chipsets, value 0x06 = hard reset, as QEMU). If that returns
it tries the keyboard controller (0x64 <- 0xfe) and a triple fault.

PM timer. A 24-bit counter at PM_TMR_FREQUENCY_HZ, read as one 32-bit port
at PM_TMR_PORT (the top byte reads 0; the FADT's TMR_VAL_EXT flag is clear).
Linux uses it as a clocksource and as the reference that checks its LAPIC
timer and TSC calibration. PM1a event, PM1a control and the timer lie as in
QEMU's PIIX4 PM block: base, base + 4, base + 8.

ACPI mode. The FADT has no SMI_CMD port, which tells the OS the platform is
always in ACPI mode; reads of PM1A_CNT_PORT should return SCI_EN set.
"""

from __future__ import annotations

PM1A_EVT_PORT = 0x600  # PM1a event block: status (2 bytes) then enable (2 bytes)
PM1_EVT_LEN = 4
PM1_STS_LEN = 2  # PM1 status at PM1A_EVT_PORT, PM1 enable at PM1A_EVT_PORT + PM1_STS_LEN
GBL_EN = 1 << 5  # PM1_EN: global lock release event (ACPICA enables it and reads it back)
PM1A_CNT_PORT = 0x604  # PM1a control block (2 bytes)
PM1_CNT_LEN = 2
PM_TMR_PORT = 0x608  # PM timer block: one 32-bit register, the 24-bit count
PM_TMR_LEN = 4
PM_TMR_FREQUENCY_HZ = 3_579_545  # ACPI 6.4 section 4.8.3.3: 3.579545 MHz
PM_TMR_MASK = 0xFF_FFFF  # 24 bits (TMR_VAL_EXT clear)

SCI_EN = 1 << 0  # PM1_CNT: the platform is in ACPI mode
SLP_TYP_SHIFT = 10  # PM1_CNT bits 12:10
SLP_TYP_MASK = 0x7
SLP_EN = 1 << 13  # PM1_CNT: enter the sleep state in SLP_TYP

# The SLP_TYP value of the soft-off state S5, as \_S5_ in the DSDT gives it.
S5_SLP_TYP = 5

RESET_PORT = 0xCF9
RESET_VALUE = 0x06  # SYS_RST | RST_CPU: a hard reset
RST_CPU = 0x04  # reset control: a write with this bit set resets (Linux's cf9 method: 0x02, 0x06)

# The CMOS index of the RTC's century register, the FADT's CENTURY field (as QEMU):
# Linux's mc146818_get_time reads the century there.
RTC_CENTURY = 0x32

# The SCI's ISA IRQ (level triggered, active high: see the MADT's override).
SCI_IRQ = 9


def is_poweroff(port: int, value: int) -> bool:
    """True if a guest write of ``value`` to ``port`` asks for soft-off (S5)."""
    return (
        port == PM1A_CNT_PORT
        and bool(value & SLP_EN)
        and (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLP_TYP
    )


def is_reset(port: int, value: int) -> bool:
    """True if a guest write of ``value`` to ``port`` resets (RESET_VALUE or any with RST_CPU)."""
    return port == RESET_PORT and bool(value & RST_CPU)
