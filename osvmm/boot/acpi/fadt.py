"""FADT (signature "FACP", revision 6) and FACS: the fixed ACPI hardware of a partition.

The FADT is not hardware-reduced: it gives the PM1a event and control blocks
and a reset register at the I/O ports of ``osvmm.boot.acpi.pm`` so that the
guest's ACPI power-off and reset reach the VMM as port writes, and the 24-bit
PM timer there (PM_TMR_BLK and X_PM_TMR_BLK, TMR_VAL_EXT clear), the reference
Linux checks its timer calibration against, as under QEMU. It has no SMI
command port (always in ACPI mode) and no GPE blocks. CENTURY names the CMOS
RTC's century register (osvmm/devices/rtc.py). It points to
the DSDT with both DSDT and X_DSDT, and to the FACS with FIRMWARE_CTRL only
(the spec wants X_FIRMWARE_CTRL zero when FIRMWARE_CTRL is set; QEMU does so).
"""

from __future__ import annotations

import struct

from osvmm.boot.acpi import pm
from osvmm.boot.acpi.common import (
    ACCESS_BYTE,
    ACCESS_DWORD,
    ACCESS_WORD,
    ADDRESS_SPACE_SYSTEM_IO,
    NULL_GAS,
    gas,
    table,
)

FADT_REVISION = 6
FADT_MINOR_REVISION = 0  # ACPI 6.0 layout: 276 bytes, ends with the hypervisor vendor id
FADT_SIZE = 276
HYPERVISOR_VENDOR_ID = int.from_bytes(b"OSVMM\0\0\0", "little")

# Flags (ACPI 6.4 table 5.10).
WBINVD = 1 << 0
PROC_C1 = 1 << 2
PWR_BUTTON = 1 << 4  # 1: no fixed-hardware power button
SLP_BUTTON = 1 << 5  # 1: no fixed-hardware sleep button
TMR_VAL_EXT = 1 << 8  # not set: the PM timer counts 24 bits
RESET_REG_SUP = 1 << 10
FADT_FLAGS = WBINVD | PROC_C1 | PWR_BUTTON | SLP_BUTTON | RESET_REG_SUP

# IA-PC boot architecture flags (ACPI 6.4 table 5.11).
LEGACY_DEVICES = 1 << 0  # there are ISA devices (the 8250 UARTs)
IAPC_8042 = 1 << 1  # not set: no keyboard controller, Linux skips probing for one
VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH = LEGACY_DEVICES | VGA_NOT_PRESENT

PM_PROFILE_UNSPECIFIED = 0

FACS_SIZE = 64
FACS_ALIGN = 64
FACS_VERSION = 2


def build_fadt(dsdt_addr: int, facs_addr: int) -> bytes:
    """The FADT, pointing at the DSDT and FACS at these guest-physical addresses."""
    body = struct.pack(
        "<IIBBHIBBBBIIIIIIIIBBBBBBBBHHHHBBBBBHBI",
        facs_addr,  # FIRMWARE_CTRL
        dsdt_addr,  # DSDT
        0,  # reserved (INT_MODEL in ACPI 1.0)
        PM_PROFILE_UNSPECIFIED,
        pm.SCI_IRQ,  # SCI_INT
        0,  # SMI_CMD: none, the platform is always in ACPI mode
        0,  # ACPI_ENABLE
        0,  # ACPI_DISABLE
        0,  # S4BIOS_REQ
        0,  # PSTATE_CNT
        pm.PM1A_EVT_PORT,  # PM1a_EVT_BLK
        0,  # PM1b_EVT_BLK
        pm.PM1A_CNT_PORT,  # PM1a_CNT_BLK
        0,  # PM1b_CNT_BLK
        0,  # PM2_CNT_BLK
        pm.PM_TMR_PORT,  # PM_TMR_BLK
        0,  # GPE0_BLK
        0,  # GPE1_BLK
        pm.PM1_EVT_LEN,
        pm.PM1_CNT_LEN,
        0,  # PM2_CNT_LEN
        pm.PM_TMR_LEN,
        0,  # GPE0_BLK_LEN
        0,  # GPE1_BLK_LEN
        0,  # GPE1_BASE
        0,  # CST_CNT
        0x65,  # P_LVL2_LAT: > 100 us, C2 not supported
        0x3E9,  # P_LVL3_LAT: > 1000 us, C3 not supported
        0,  # FLUSH_SIZE
        0,  # FLUSH_STRIDE
        0,  # DUTY_OFFSET
        0,  # DUTY_WIDTH
        0,  # DAY_ALRM
        0,  # MON_ALRM
        pm.RTC_CENTURY,  # CENTURY: the CMOS index of the RTC's century
        IAPC_BOOT_ARCH,
        0,  # reserved
        FADT_FLAGS,
    )
    body += gas(ADDRESS_SPACE_SYSTEM_IO, 8, pm.RESET_PORT, ACCESS_BYTE)  # RESET_REG
    body += struct.pack(
        "<BHBQQ",
        pm.RESET_VALUE,
        0,  # ARM_BOOT_ARCH
        FADT_MINOR_REVISION,
        0,  # X_FIRMWARE_CTRL: must be 0 when FIRMWARE_CTRL is set (ACPI 6.4 table 5.9)
        dsdt_addr,  # X_DSDT
    )
    body += gas(ADDRESS_SPACE_SYSTEM_IO, pm.PM1_EVT_LEN * 8, pm.PM1A_EVT_PORT, ACCESS_WORD)
    body += NULL_GAS  # X_PM1b_EVT_BLK
    body += gas(ADDRESS_SPACE_SYSTEM_IO, pm.PM1_CNT_LEN * 8, pm.PM1A_CNT_PORT, ACCESS_WORD)
    body += NULL_GAS  # X_PM1b_CNT_BLK
    body += NULL_GAS  # X_PM2_CNT_BLK
    body += gas(ADDRESS_SPACE_SYSTEM_IO, pm.PM_TMR_LEN * 8, pm.PM_TMR_PORT, ACCESS_DWORD)
    body += NULL_GAS  # X_GPE0_BLK
    body += NULL_GAS  # X_GPE1_BLK
    body += NULL_GAS  # SLEEP_CONTROL_REG (hardware-reduced only)
    body += NULL_GAS  # SLEEP_STATUS_REG
    body += struct.pack("<Q", HYPERVISOR_VENDOR_ID)
    data = table(b"FACP", FADT_REVISION, body)
    assert len(data) == FADT_SIZE, len(data)
    return data


def build_facs() -> bytes:
    """The FACS (64 bytes, no checksum): no waking vector, no global lock owner."""
    data = struct.pack(
        "<4sIIIIIQB3sI24s",
        b"FACS",
        FACS_SIZE,
        0,  # hardware signature
        0,  # firmware waking vector
        0,  # global lock
        0,  # flags: no S4BIOS, no 64-bit wake
        0,  # X_FIRMWARE_WAKING_VECTOR
        FACS_VERSION,
        b"\0\0\0",
        0,  # OSPM flags
        b"\0" * 24,
    )
    assert len(data) == FACS_SIZE
    return data
