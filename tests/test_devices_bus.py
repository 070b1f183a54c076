"""The port-I/O bus and the MMIO bus: claiming, splitting, unclaimed accesses."""

from __future__ import annotations

import pytest

from osvmm.devices.bus import PortBus
from osvmm.devices.mmio import MmioBus


class ByteDevice:
    """Byte registers that remember what was written, and log every access."""

    def __init__(self, size: int, fill: int = 0):
        self.regs = bytearray([fill] * size)
        self.log: list[tuple] = []

    def read(self, offset: int) -> int:
        self.log.append(("r", offset))
        return self.regs[offset]

    def write(self, offset: int, value: int) -> None:
        self.log.append(("w", offset, value))
        self.regs[offset] = value


class WideReader(ByteDevice):
    def read(self, offset: int) -> int:
        return 0x1234  # the bus must keep only a byte


# -- port I/O -------------------------------------------------------------------------------


def test_register_and_claimed():
    bus = PortBus()
    bus.register(0x3F8, 8, ByteDevice(8))
    assert bus.claimed(0x3F8) and bus.claimed(0x3FF)
    assert not bus.claimed(0x3F7) and not bus.claimed(0x400)


@pytest.mark.parametrize(("base", "length"), [(0x3F8, 1), (0x3F0, 9), (0x3FF, 4), (0x3FA, 2)])
def test_overlapping_registration_is_rejected(base, length):
    bus = PortBus()
    dev = ByteDevice(8)
    bus.register(0x3F8, 8, dev)
    with pytest.raises(ValueError, match="already claimed"):
        bus.register(base, length, ByteDevice(length))
    # A rejected registration claims nothing, and the first device keeps its ports.
    claimed = {p for p in range(0x3E0, 0x420) if bus.claimed(p)}
    assert claimed == set(range(0x3F8, 0x400))
    bus.write(0x3F8, b"\x11")
    assert dev.regs[0] == 0x11


def test_byte_access_reaches_the_device_at_its_offset():
    bus = PortBus()
    dev = ByteDevice(8)
    bus.register(0x3F8, 8, dev)
    bus.write(0x3FB, b"\x83")
    assert dev.log == [("w", 3, 0x83)]
    assert bus.read(0x3FB, 1) == b"\x83"


def test_multi_byte_accesses_split_across_consecutive_ports():
    bus = PortBus()
    dev = ByteDevice(8)
    bus.register(0x510, 8, dev)
    bus.write(0x512, b"\x01\x02\x03\x04")  # outl
    assert dev.log == [("w", 2, 1), ("w", 3, 2), ("w", 4, 3), ("w", 5, 4)]
    dev.log.clear()
    assert bus.read(0x513, 2) == b"\x02\x03"  # inw
    assert dev.log == [("r", 1 + 2), ("r", 2 + 2)]


def test_access_spanning_two_devices_and_a_gap():
    bus = PortBus()
    a, b = ByteDevice(2, fill=0xA0), ByteDevice(2, fill=0xB0)
    bus.register(0x100, 2, a)
    bus.register(0x103, 2, b)
    assert bus.read(0x101, 3) == b"\xa0\xff\xb0"
    bus.write(0x101, b"\x01\x02\x03")
    assert (a.regs[1], b.regs[0]) == (1, 3)
    assert bus.unclaimed == {0x102: 2}


def test_unclaimed_ports_read_ff_ignore_writes_and_are_counted():
    bus = PortBus()
    assert bus.read(0x80, 1) == b"\xff"
    assert bus.read(0x60, 4) == b"\xff\xff\xff\xff"
    bus.write(0x80, b"\x00")
    assert bus.unclaimed[0x80] == 2
    assert bus.unclaimed[0x60] == bus.unclaimed[0x63] == 1
    assert sum(bus.unclaimed.values()) == 6


def test_read_keeps_the_low_byte_of_what_a_device_returns():
    bus = PortBus()
    bus.register(0x70, 2, WideReader(2))
    assert bus.read(0x70, 2) == b"\x34\x34"


class Counter4:
    """A 4-byte register read whole: each read_wide is one sample of a counter."""

    def __init__(self):
        self.samples = 0
        self.log: list[tuple] = []

    def read_wide(self, offset: int, size: int) -> int:
        self.log.append(("wide", offset, size))
        self.samples += 1
        value = 0x1_0403_0201 * self.samples  # 5 bytes: the bus keeps `size` of them
        return value >> (8 * offset)

    def read(self, offset: int) -> int:
        self.log.append(("r", offset))
        return 0xA0 + offset

    def write(self, offset: int, value: int) -> None:
        self.log.append(("w", offset, value))


def test_wide_read_is_one_call_within_the_device():
    bus = PortBus()
    dev = Counter4()
    bus.register(0x608, 4, dev)
    assert bus.read(0x608, 4) == bytes([1, 2, 3, 4])  # inl: one sample, not four
    assert bus.read(0x60A, 2) == bytes([6, 8])  # inw at offset 2: bytes 2-3 of sample 2
    assert dev.log == [("wide", 0, 4), ("wide", 2, 2)]
    dev.log.clear()
    # Byte reads, and reads running past the device, go byte by byte.
    assert bus.read(0x609, 1) == b"\xa1"
    assert bus.read(0x60A, 4) == b"\xa2\xa3\xff\xff"
    assert dev.log == [("r", 1), ("r", 2), ("r", 3)]
    assert bus.unclaimed == {0x60C: 1, 0x60D: 1}
    bus.write(0x608, b"\x01\x02")  # writes stay byte-wide
    assert dev.log[-2:] == [("w", 0, 1), ("w", 1, 2)]


# -- MMIO --------------------------------------------------------------------------------------


class MmioDevice:
    def __init__(self):
        self.log: list[tuple] = []

    def mmio_read(self, offset: int, length: int) -> bytes:
        self.log.append(("r", offset, length))
        return bytes(range(offset & 0xFF, (offset & 0xFF) + length))

    def mmio_write(self, offset: int, data: bytes) -> None:
        self.log.append(("w", offset, bytes(data)))


def test_mmio_dispatch_with_offsets():
    bus = MmioBus()
    dev = MmioDevice()
    bus.register(0xD000_0000, 0x1000, dev)
    bus.write(0xD000_0010, b"\x01\x02\x03\x04")
    assert bus.read(0xD000_0FF8, 8) == bytes(range(0xF8, 0x100))
    assert dev.log == [("w", 0x10, b"\x01\x02\x03\x04"), ("r", 0xFF8, 8)]


@pytest.mark.parametrize(
    ("base", "size"),
    [(0xD000_0000, 0x1000), (0xCFFF_F000, 0x2000), (0xD000_0FFF, 1), (0xCFFF_0000, 0x20000)],
)
def test_mmio_overlap_rejected(base, size):
    bus = MmioBus()
    bus.register(0xD000_0000, 0x1000, MmioDevice())
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(base, size, MmioDevice())


def test_mmio_adjacent_ranges_are_accepted():
    bus = MmioBus()
    low, high = MmioDevice(), MmioDevice()
    bus.register(0xD000_0000, 0x1000, low)
    bus.register(0xD000_1000, 0x1000, high)
    bus.register(0xCFFF_F000, 0x1000, MmioDevice())
    bus.write(0xD000_1000, b"\x05")
    bus.write(0xD000_0FFF, b"\x06")
    assert high.log == [("w", 0, b"\x05")]
    assert low.log == [("w", 0xFFF, b"\x06")]


def test_mmio_unclaimed_reads_ff_and_counts_by_page():
    bus = MmioBus()
    bus.register(0xD000_0000, 0x1000, MmioDevice())
    assert bus.read(0xFED0_00F0, 4) == b"\xff" * 4
    assert bus.read(0xFED0_0FF8, 8) == b"\xff" * 8
    bus.write(0xD000_1000, b"\x00")
    assert bus.unclaimed == {0xFED0_0000: 2, 0xD000_1000: 1}
