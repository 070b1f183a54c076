"""The port-I/O bus: which device answers which port.

Devices expose ``read(offset) -> int`` and ``write(offset, value)`` on byte
registers. Every port of a device is an entry of one dict, so an exit costs
one lookup. Accesses wider than a byte are split into byte accesses at
consecutive ports (as the 8250 and isa-debug-exit are byte devices); ports
nobody claims read as all ones and ignore writes, as on a PC, and are counted.

A device whose register must be read whole (the ACPI PM timer: four bytes of
one counter value, which byte reads taken one after another could tear) also
has ``read_wide(offset, size) -> int``: a read wider than a byte that lies
within that device is one call, its value returned little-endian.
"""

from __future__ import annotations

from collections import Counter


class PortBus:
    def __init__(self):
        self._ports: dict[int, tuple[object, int]] = {}
        self._fast: dict[int, tuple] = {}
        self._wide: dict[int, tuple] = {}  # port -> (read_wide, offset, length)
        self.unclaimed = Counter()  # port -> accesses to no device

    def register(self, base: int, length: int, device) -> None:
        # Check every port first: a rejected registration must claim nothing.
        for port in range(base, base + length):
            if port in self._ports:
                raise ValueError(f"port {port:#x} is already claimed")
        for port in range(base, base + length):
            self._ports[port] = (device, port - base)
            self._fast[port] = (device.write, device.read, port - base)
            if hasattr(device, "read_wide"):
                self._wide[port] = (device.read_wide, port - base, length)

    def byte_handlers(self) -> dict[int, tuple]:
        """port -> (write(offset, value), read(offset), offset): the exit loop's fast path
        for single-byte accesses; the dict is shared, so later registrations show."""
        return self._fast

    def claimed(self, port: int) -> bool:
        return port in self._ports

    def write(self, port: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            entry = self._ports.get(port + i)
            if entry is None:
                self.unclaimed[port + i] += 1
            else:
                entry[0].write(entry[1], byte)

    def read(self, port: int, size: int) -> bytes:
        if size > 1:
            wide = self._wide.get(port)
            if wide is not None and wide[1] + size <= wide[2]:
                value = wide[0](wide[1], size) & ((1 << (8 * size)) - 1)
                return value.to_bytes(size, "little")
        out = bytearray()
        for i in range(size):
            entry = self._ports.get(port + i)
            if entry is None:
                self.unclaimed[port + i] += 1
                out.append(0xFF)
            else:
                out.append(entry[0].read(entry[1]) & 0xFF)
        return bytes(out)
