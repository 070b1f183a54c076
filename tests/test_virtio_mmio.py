"""The virtio-mmio transport (version 2) driven as Linux's virtio_mmio driver does:
identification, feature negotiation, queue set-up, notify, interrupt status and
acknowledge, reset; malformed set-ups and chains set DEVICE_NEEDS_RESET."""

from __future__ import annotations

import struct

import pytest

from osvmm.arch.x86 import irq, layout
from osvmm.devices.virtio import spec
from osvmm.devices.virtio.mmio import VirtioMmio, slot
from osvmm.devices.virtio.queue import QueueError
from tests.virtio_driver import AVAIL, DESC, USED, Driver, memory


class EchoModel:
    """A device with one queue that writes the readable bytes back, reversed."""

    device_id = 42
    num_queues = 2
    queue_max = 16
    features = 1 << spec.VIRTIO_F_VERSION_1 | 1 << spec.VIRTIO_F_INDIRECT_DESC | 1 << 3
    config = bytes(range(1, 11))

    def __init__(self, memory):
        self.memory = memory
        self.resets = 0
        self.served = 0

    def reset(self):
        self.resets += 1

    def serve(self, index, queue):
        pushed = False
        while (chain := queue.pop()) is not None:
            data = chain.read(self.memory, 0, chain.readable_len)
            queue.push(chain.head, chain.write(self.memory, 0, data[::-1]))
            self.served += 1
            pushed = True
        return pushed and queue.needs_interrupt()


class Bus:
    def __init__(self, dev):
        self.dev = dev

    def r(self, off):
        return struct.unpack("<I", self.dev.mmio_read(off, 4))[0]

    def w(self, off, value):
        self.dev.mmio_write(off, struct.pack("<I", value))


@pytest.fixture
def setup():
    mem = memory()
    model = EchoModel(mem)
    raised = []
    dev = VirtioMmio(model, mem, interrupt=lambda: raised.append(1))
    yield mem, model, dev, Bus(dev), raised
    mem.close()


def probe(bus, features=1 << spec.VIRTIO_F_VERSION_1, size=8, desc=DESC, avail=AVAIL, used=USED):
    """Linux's virtio_mmio probe and virtio_dev_probe, then one queue set up."""
    assert bus.r(spec.MAGIC_VALUE) == 0x74726976
    assert bus.r(spec.VERSION) == 2
    bus.w(spec.STATUS, 0)
    bus.w(spec.STATUS, spec.ACKNOWLEDGE)
    bus.w(spec.STATUS, spec.ACKNOWLEDGE | spec.DRIVER)
    bus.w(spec.DRIVER_FEATURES_SEL, 0)
    bus.w(spec.DRIVER_FEATURES, features & 0xFFFFFFFF)
    bus.w(spec.DRIVER_FEATURES_SEL, 1)
    bus.w(spec.DRIVER_FEATURES, features >> 32)
    bus.w(spec.STATUS, spec.ACKNOWLEDGE | spec.DRIVER | spec.FEATURES_OK)
    bus.w(spec.QUEUE_SEL, 0)
    assert bus.r(spec.QUEUE_READY) == 0
    assert bus.r(spec.QUEUE_NUM_MAX) == 16
    bus.w(spec.QUEUE_NUM, size)
    for reg, addr in (
        (spec.QUEUE_DESC_LOW, desc),
        (spec.QUEUE_DRIVER_LOW, avail),
        (spec.QUEUE_DEVICE_LOW, used),
    ):
        bus.w(reg, addr & 0xFFFFFFFF)
        bus.w(reg + 4, addr >> 32)
    bus.w(spec.QUEUE_READY, 1)
    bus.w(spec.STATUS, spec.ACKNOWLEDGE | spec.DRIVER | spec.FEATURES_OK | spec.DRIVER_OK)


def test_identification_and_features(setup):
    _, model, dev, bus, _ = setup
    assert bus.r(spec.DEVICE_ID) == 42
    assert bus.r(spec.VENDOR_ID) == int.from_bytes(b"OSVM", "little")
    bus.w(spec.DEVICE_FEATURES_SEL, 0)
    assert bus.r(spec.DEVICE_FEATURES) == 1 << spec.VIRTIO_F_INDIRECT_DESC | 1 << 3
    bus.w(spec.DEVICE_FEATURES_SEL, 1)
    assert bus.r(spec.DEVICE_FEATURES) == 1  # VIRTIO_F_VERSION_1 is bit 32
    bus.w(spec.DEVICE_FEATURES_SEL, 2)
    assert bus.r(spec.DEVICE_FEATURES) == 0
    assert bus.r(spec.CONFIG_GENERATION) == 0
    assert bus.r(spec.SHM_LEN_LOW) == 0xFFFFFFFF  # no shared memory region


def test_config_space_any_width_and_beyond_its_end(setup):
    _, _, dev, _, _ = setup
    assert dev.mmio_read(spec.CONFIG, 1) == b"\x01"
    assert dev.mmio_read(spec.CONFIG + 2, 2) == b"\x03\x04"
    assert dev.mmio_read(spec.CONFIG + 8, 4) == b"\x09\x0a\0\0"
    assert dev.mmio_read(spec.CONFIG + 0x200, 8) == bytes(8)
    dev.mmio_write(spec.CONFIG, b"\xff")  # ignored
    assert dev.mmio_read(spec.CONFIG, 1) == b"\x01"


def test_registers_of_other_widths_read_zero_and_ignore_writes(setup):
    _, _, dev, bus, _ = setup
    assert dev.mmio_read(spec.MAGIC_VALUE, 2) == b"\0\0"
    assert dev.mmio_read(spec.MAGIC_VALUE + 1, 4) == bytes(4)
    dev.mmio_write(spec.STATUS, b"\x01")
    assert bus.r(spec.STATUS) == 0


def test_features_ok_refused_for_unoffered_features_or_without_version_1(setup):
    _, _, _, bus, _ = setup
    for features in (1 << 7, 1 << spec.VIRTIO_F_INDIRECT_DESC):
        bus.w(spec.STATUS, 0)
        bus.w(spec.DRIVER_FEATURES_SEL, 0)
        bus.w(spec.DRIVER_FEATURES, features)
        bus.w(spec.DRIVER_FEATURES_SEL, 1)
        bus.w(spec.DRIVER_FEATURES, 1 if features == 1 << 7 else 0)
        bus.w(spec.STATUS, spec.ACKNOWLEDGE | spec.DRIVER | spec.FEATURES_OK)
        assert not bus.r(spec.STATUS) & spec.FEATURES_OK


def test_a_request_served_and_interrupt_acknowledged(setup):
    mem, model, dev, bus, raised = setup
    probe(bus)
    assert bus.r(spec.QUEUE_READY) == 1
    d = Driver(mem)
    src, dst = d.buffer(b"virtio"), d.buffer(6)
    d.make_available(d.chain([(src, 6, False), (dst, 6, True)]))
    bus.w(spec.QUEUE_NOTIFY, 0)  # no notify callback: served on this thread
    assert mem.read(dst, 6) == b"oitriv"
    assert d.take_used() == [(0, 6)]
    assert raised == [1]
    assert bus.r(spec.INTERRUPT_STATUS) == spec.VIRTIO_MMIO_INT_VRING
    bus.w(spec.INTERRUPT_ACK, spec.VIRTIO_MMIO_INT_VRING)
    assert bus.r(spec.INTERRUPT_STATUS) == 0


def test_notify_goes_to_the_callback_when_one_is_given(setup):
    mem, model, _, _, _ = setup
    seen = []
    dev = VirtioMmio(model, mem, interrupt=lambda: None, notify=seen.append)
    bus = Bus(dev)
    probe(bus)
    bus.w(spec.QUEUE_NOTIFY, 1)
    bus.w(spec.QUEUE_NOTIFY, 7)  # no such queue: ignored
    assert seen == [1] and model.served == 0


def test_nothing_is_served_before_driver_ok(setup):
    mem, model, dev, bus, _ = setup
    bus.w(spec.STATUS, spec.ACKNOWLEDGE | spec.DRIVER)
    d = Driver(mem)
    d.make_available(d.chain([(d.buffer(1), 1, True)]))
    dev.process(0)
    assert model.served == 0


def test_queue_registers_are_frozen_while_ready(setup):
    _, _, _, bus, _ = setup
    probe(bus)
    bus.w(spec.QUEUE_NUM, 4)
    bus.w(spec.QUEUE_DESC_LOW, 0x8000)
    assert bus.r(spec.QUEUE_DESC_LOW) == DESC
    bus.w(spec.QUEUE_SEL, 5)  # no such queue
    assert bus.r(spec.QUEUE_NUM_MAX) == 0 and bus.r(spec.QUEUE_READY) == 0
    bus.w(spec.QUEUE_READY, 1)  # ignored


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"size": 32}, "over the device's 16"),
        ({"size": 6}, "power of two"),
        ({"desc": 1 << 40}, "not in guest RAM"),
        ({"used": USED + 1}, "aligned"),
    ],
)
def test_a_bad_queue_set_up_needs_reset(setup, kw, why):
    _, _, dev, bus, raised = setup
    probe(bus, **kw)
    assert bus.r(spec.QUEUE_READY) == 0
    assert bus.r(spec.STATUS) & spec.DEVICE_NEEDS_RESET
    assert why in dev.error


def test_a_malformed_chain_needs_reset_and_a_config_interrupt(setup):
    mem, model, dev, bus, raised = setup
    probe(bus)
    d = Driver(mem)
    d.set_desc(0, 1 << 45, 16, 0)  # outside guest RAM
    d.make_available(0)
    bus.w(spec.QUEUE_NOTIFY, 0)
    status = bus.r(spec.STATUS)
    assert status & spec.DEVICE_NEEDS_RESET and status & spec.DRIVER_OK
    assert bus.r(spec.INTERRUPT_STATUS) & spec.VIRTIO_MMIO_INT_CONFIG
    assert raised == [1] and "not in guest RAM" in dev.error
    # Nothing more is served until a reset, which clears it all.
    d.make_available(d.chain([(d.buffer(b"x"), 1, False), (d.buffer(1), 1, True)]))
    dev.process(0)
    assert model.served == 0
    bus.w(spec.STATUS, spec.DRIVER)  # the driver cannot clear the device's bit
    assert bus.r(spec.STATUS) & spec.DEVICE_NEEDS_RESET
    bus.w(spec.STATUS, 0)
    assert bus.r(spec.STATUS) == 0 and dev.error is None and model.resets == 2  # probe, here
    assert bus.r(spec.INTERRUPT_STATUS) == 0 and bus.r(spec.QUEUE_READY) == 0


def test_a_model_queue_error_needs_reset(setup):
    mem, model, dev, bus, _ = setup

    def broken(index, queue):
        raise QueueError("no status byte")

    model.serve = broken
    probe(bus)
    dev.process(0)
    assert dev.error == "queue 0: no status byte"


def test_slots_are_outside_ram_on_isa_irqs_of_their_own():
    bases = [slot(i)[0] for i in range(len(irq.VIRTIO_IRQS))]
    assert bases[0] == layout.VIRTIO_MMIO_BASE >= layout.MMIO_HOLE_START
    assert bases[-1] + layout.VIRTIO_MMIO_SIZE <= layout.CHANNEL_WINDOW_START
    assert [slot(i)[1] for i in range(len(bases))] == list(irq.VIRTIO_IRQS)
    for line in irq.VIRTIO_IRQS:  # ISA IRQs no platform device uses, on their own pin
        assert line < irq.ISA_IRQS and irq.isa_pin(line) == line
        assert line not in (irq.PIT_IRQ, irq.CASCADE_IRQ, 1, 3, 4, 8, 9, 12, 13)
    with pytest.raises(ValueError):
        slot(len(irq.VIRTIO_IRQS))
    with pytest.raises(ValueError):
        slot(-1)
