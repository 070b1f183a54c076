"""The ACPI PM timer: a free-running 24-bit counter at 3.579545 MHz (ACPI 6.4 section 4.8.3.3).

The FADT announces it at ``pm.PM_TMR_PORT`` (PM_TMR_BLK, four bytes, TMR_VAL_EXT
clear). The count is derived from an injected monotonic clock in nanoseconds
(the VMM passes ``time.monotonic_ns``) and starts at 0 when the model is made;
it wraps every 2**24 ticks (about 4.7 s), as the hardware does. Nothing is
stored between reads, so the model does no I/O and keeps no timer running.

Linux reads it with one ``inl`` (``acpi_pm_read``, and ``acpi_pm_read_early``
while calibrating the TSC and the LAPIC timer). ``read_wide`` serves such a
read from one sample of the clock, so its four bytes never tear across a carry;
byte reads sample the clock each. Writes are ignored: the register is read-only.
The timer-overflow event (TMR_STS, TMR_EN) is never raised: PM1 status reads 0.
"""

from __future__ import annotations

from collections.abc import Callable

from osvmm.boot.acpi import pm

NS_PER_S = 1_000_000_000


class PmTimer:
    def __init__(self, monotonic_ns: Callable[[], int]):
        self._clock = monotonic_ns
        self._start = monotonic_ns()

    def count(self) -> int:
        """The 24-bit count now: ticks of PM_TMR_FREQUENCY_HZ since the model was made."""
        elapsed = self._clock() - self._start
        return (elapsed * pm.PM_TMR_FREQUENCY_HZ // NS_PER_S) & pm.PM_TMR_MASK

    def read_wide(self, offset: int, size: int) -> int:
        return self.count() >> (8 * offset)

    def read(self, offset: int) -> int:
        return (self.count() >> (8 * offset)) & 0xFF

    def write(self, offset: int, value: int) -> None:
        pass

    # -- snapshots: the count goes on from where it was, as the guest's TSC does ------
    def state(self) -> dict:
        return {"elapsed_ns": self._clock() - self._start}

    def restore(self, state: dict) -> None:
        self._start = self._clock() - int(state["elapsed_ns"])


def register_pm_timer(bus, monotonic_ns: Callable[[], int]) -> PmTimer:
    timer = PmTimer(monotonic_ns)
    bus.register(pm.PM_TMR_PORT, pm.PM_TMR_LEN, timer)
    return timer
