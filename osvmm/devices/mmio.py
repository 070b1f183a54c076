"""The MMIO bus: guest-physical addresses outside RAM that a device answers.

osvmm's partitions have no MMIO devices of their own (the LAPIC and I/O APIC
are KVM's, in the kernel); an access to an address nobody claims reads as all
ones and ignores writes, as on a PC, and is counted so ``--stats`` shows it.
"""

from __future__ import annotations

from collections import Counter


class MmioBus:
    def __init__(self):
        self._devices: list[tuple[int, int, object]] = []
        self.unclaimed = Counter()  # 4 KiB page address -> accesses

    def register(self, base: int, size: int, device) -> None:
        for b, s, _ in self._devices:
            if base < b + s and b < base + size:
                raise ValueError(f"MMIO range {base:#x}+{size:#x} overlaps {b:#x}+{s:#x}")
        self._devices.append((base, size, device))

    def _find(self, addr: int):
        for base, size, dev in self._devices:
            if base <= addr < base + size:
                return dev, addr - base
        self.unclaimed[addr & ~0xFFF] += 1
        return None, 0

    def write(self, addr: int, data: bytes) -> None:
        dev, off = self._find(addr)
        if dev is not None:
            dev.mmio_write(off, data)

    def read(self, addr: int, length: int) -> bytes:
        dev, off = self._find(addr)
        if dev is None:
            return b"\xff" * length
        return dev.mmio_read(off, length)
