"""Power-off and reset: the ACPI PM1 blocks, the 0xcf9 reset register, the i8042 reset line.

What the partition's FADT and DSDT announce (osvmm/boot/acpi/pm.py) is what
this model traps; nothing else about power management is emulated:
  - PM1a event block: status (2 bytes) reads 0, as no event is ever raised,
    and a write-1-to-clear there is harmless; enable (2 bytes) reads back what
    was written (ACPICA checks: Linux's "Could not enable GlobalLock event"
    came from an enable register that did not);
  - PM1a control: reads SCI_EN (always in ACPI mode); a write with SLP_EN
    and SLP_TYP = S5 powers the partition off;
  - 0xcf9 (reset control, the FADT's RESET_REG): a write with RST_CPU resets;
  - 0x64 (i8042 command port): 0xfe pulses the reset line, Linux's fallback.
    Reads return 0xff, as a PC with no keyboard controller.
Registers are byte-wide on the port bus; PM1 control assembles its 16 bits.
"""

from __future__ import annotations

from collections.abc import Callable

from osvmm.boot.acpi import pm

I8042_COMMAND_PORT = 0x64
I8042_CMD_PULSE_RESET = 0xFE


class Pm1Event:
    """PM1 status (offsets 0-1, write 1 to clear) and PM1 enable (offsets 2-3)."""

    def __init__(self):
        self.enable = 0  # PM1_EN as the guest last wrote it; no SCI is ever raised

    def read(self, offset: int) -> int:
        if offset < pm.PM1_STS_LEN:
            return 0  # no status bit is ever set
        return (self.enable >> (8 * (offset - pm.PM1_STS_LEN))) & 0xFF

    def write(self, offset: int, value: int) -> None:
        if offset < pm.PM1_STS_LEN:
            return  # write-1-to-clear of bits that are never set
        shift = 8 * (offset - pm.PM1_STS_LEN)
        self.enable = (self.enable & ~(0xFF << shift)) | ((value & 0xFF) << shift)

    def state(self) -> dict:
        return {"enable": self.enable}

    def restore(self, state: dict) -> None:
        self.enable = int(state["enable"]) & 0xFFFF


class Pm1Control:
    def __init__(self, on_poweroff: Callable[[], None]):
        self._on_poweroff = on_poweroff
        self.value = pm.SCI_EN

    def read(self, offset: int) -> int:
        return ((self.value | pm.SCI_EN) >> (8 * offset)) & 0xFF

    def write(self, offset: int, value: int) -> None:
        shift = 8 * offset
        self.value = (self.value & ~(0xFF << shift)) | (value << shift)
        if pm.is_poweroff(pm.PM1A_CNT_PORT, self.value):
            self.value &= ~pm.SLP_EN
            self._on_poweroff()

    def state(self) -> dict:
        return {"value": self.value}

    def restore(self, state: dict) -> None:
        self.value = int(state["value"]) & 0xFFFF


class ResetControl:
    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset
        self.value = 0

    def read(self, offset: int) -> int:
        return self.value

    def write(self, offset: int, value: int) -> None:
        self.value = value & ~pm.RST_CPU
        if pm.is_reset(pm.RESET_PORT, value):
            self._on_reset()

    def state(self) -> dict:
        return {"value": self.value}

    def restore(self, state: dict) -> None:
        self.value = int(state["value"]) & 0xFF


class I8042Reset:
    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset

    def read(self, offset: int) -> int:
        return 0xFF

    def write(self, offset: int, value: int) -> None:
        if value == I8042_CMD_PULSE_RESET:
            self._on_reset()


def register_power_devices(bus, on_poweroff, on_reset) -> dict:
    """Register the power devices; returns those with state, by name (snapshots)."""
    devices = {
        "pm1_event": Pm1Event(),
        "pm1_control": Pm1Control(on_poweroff),
        "reset_control": ResetControl(on_reset),
    }
    bus.register(pm.PM1A_EVT_PORT, pm.PM1_EVT_LEN, devices["pm1_event"])
    bus.register(pm.PM1A_CNT_PORT, pm.PM1_CNT_LEN, devices["pm1_control"])
    bus.register(pm.RESET_PORT, 1, devices["reset_control"])
    bus.register(I8042_COMMAND_PORT, 1, I8042Reset(on_reset))
    return devices
