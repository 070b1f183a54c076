"""Console input (the escape, stdin forwarding, the UART feed) and the power-off / reset ports
(no /dev/kvm)."""

from __future__ import annotations

import os
import time

from osvmm.boot.acpi import pm
from osvmm.devices.bus import PortBus
from osvmm.devices.power import register_power_devices
from osvmm.devices.serial import FIFO_CAPACITY, UART_IER, UART_IER_RDI, UART_RX, Serial
from osvmm.vmm.console import StdinForwarder, feed_uart
from osvmm.vmm.escape import ConsoleEscape


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_stdin_bytes_reach_the_uart_and_raise_its_interrupt():
    levels = []
    serial = Serial(lambda data: None, irq=levels.append)
    serial.write(UART_IER, UART_IER_RDI)
    r, w = os.pipe()
    fwd = StdinForwarder(serial, on_quit=lambda: None, fd=r)
    fwd.start()
    try:
        os.write(w, b"ls\r")
        assert _wait(lambda: serial.fifo_len == 3)
        assert levels == [1]
        assert bytes(serial.read(UART_RX) for _ in range(3)) == b"ls\r"
        assert levels == [1, 0]
    finally:
        fwd.stop()
        os.close(w)
        os.close(r)


def test_input_beyond_the_fifo_waits_and_is_delivered_in_order():
    serial = Serial(lambda data: None)
    r, w = os.pipe()
    fwd = StdinForwarder(serial, on_quit=lambda: None, fd=r)
    fwd.start()
    try:
        data = bytes(range(32, 32 + FIFO_CAPACITY)) * 2
        os.write(w, data)
        got = bytearray()
        end = time.monotonic() + 5
        while len(got) < len(data) and time.monotonic() < end:
            assert serial.fifo_len <= FIFO_CAPACITY
            if serial.fifo_len:
                got.append(serial.read(UART_RX))
            else:
                time.sleep(0.005)
        assert bytes(got) == data
    finally:
        fwd.stop()
        os.close(w)
        os.close(r)


def test_ctrl_a_x_quits():
    quits = []
    serial = Serial(lambda data: None)
    r, w = os.pipe()
    fwd = StdinForwarder(serial, on_quit=lambda: quits.append(1), fd=r)
    fwd.start()
    try:
        os.write(w, b"\x01x")
        assert _wait(lambda: quits == [1])
        assert serial.fifo_len == 0
    finally:
        fwd.stop()
        os.close(w)
        os.close(r)


def test_escape_split_across_reads():
    esc = ConsoleEscape()
    assert esc.feed(b"ab\x01") == (b"ab", False)  # the Ctrl-A waits for its next byte
    assert esc.feed(b"xcd") == (b"", True)  # ... an x: the escape; what follows is not sent


def test_escape_in_one_read_and_a_lone_ctrl_a():
    assert ConsoleEscape().feed(b"ls\x01xrm") == (b"ls", True)
    esc = ConsoleEscape()
    assert esc.feed(b"\x01") == (b"", False)
    assert esc.feed(b"b") == (b"\x01b", False)  # Ctrl-A then not x: both pass
    assert esc.feed(b"\x01\x01") == (b"\x01", False)
    assert esc.feed(b"x") == (b"", True)
    assert esc.feed(b"") == (b"", False)


def test_ctrl_a_x_split_across_reads_quits_after_the_bytes_before_it():
    quits = []
    serial = Serial(lambda data: None)
    r, w = os.pipe()
    fwd = StdinForwarder(serial, on_quit=lambda: quits.append(1), fd=r)
    fwd.start()
    try:
        os.write(w, b"ok\x01")
        assert _wait(lambda: serial.fifo_len == 2)
        os.write(w, b"x")
        assert _wait(lambda: quits == [1])
        assert bytes(serial.read(UART_RX) for _ in range(2)) == b"ok"
    finally:
        fwd.stop()
        os.close(w)
        os.close(r)


def test_feed_uart_retries_a_full_fifo_and_drops_once_the_target_is_gone():
    serial = Serial(lambda data: None)
    data = bytes(FIFO_CAPACITY + 5)
    offers = []

    def serial_of():
        offers.append(1)
        if len(offers) == 3:
            for _ in range(FIFO_CAPACITY):
                serial.read(UART_RX)
        return serial

    assert feed_uart(serial_of, data) is True
    assert serial.fifo_len == 5 and len(offers) == 3
    assert feed_uart(lambda: None, b"lost") is False


def _power_bus():
    events = []
    bus = PortBus()
    register_power_devices(
        bus, on_poweroff=lambda: events.append("off"), on_reset=lambda: events.append("reset")
    )
    return bus, events


def test_acpi_s5_sequence_powers_off_once():
    bus, events = _power_bus()
    slp_typ = pm.S5_SLP_TYP << pm.SLP_TYP_SHIFT
    bus.write(pm.PM1A_EVT_PORT, (0xFFFF).to_bytes(2, "little"))  # clear status
    bus.write(pm.PM1A_CNT_PORT, (slp_typ | pm.SCI_EN).to_bytes(2, "little"))
    assert events == []  # SLP_TYP without SLP_EN: not yet
    bus.write(pm.PM1A_CNT_PORT, (slp_typ | pm.SLP_EN | pm.SCI_EN).to_bytes(2, "little"))
    assert events == ["off"]


def test_pm1_control_reads_acpi_mode_and_other_sleep_states_do_nothing():
    bus, events = _power_bus()
    assert int.from_bytes(bus.read(pm.PM1A_CNT_PORT, 2), "little") & pm.SCI_EN
    s3 = 3 << pm.SLP_TYP_SHIFT
    bus.write(pm.PM1A_CNT_PORT, (s3 | pm.SLP_EN).to_bytes(2, "little"))
    assert events == []


def test_pm1_enable_reads_back_and_status_reads_zero():
    bus, events = _power_bus()
    status, enable = pm.PM1A_EVT_PORT, pm.PM1A_EVT_PORT + pm.PM1_STS_LEN
    assert bus.read(status, 4) == bytes(4)
    # ACPICA enables the global lock event and reads PM1_EN back to check it.
    bus.write(enable, pm.GBL_EN.to_bytes(2, "little"))
    assert int.from_bytes(bus.read(enable, 2), "little") == pm.GBL_EN
    bus.write(enable + 1, b"\x01")  # a byte write to the high half keeps the low half
    assert int.from_bytes(bus.read(enable, 2), "little") == 0x100 | pm.GBL_EN
    # Status reads 0 and write-1-to-clear is harmless: enable is untouched.
    bus.write(status, (0xFFFF).to_bytes(2, "little"))
    assert bus.read(status, 2) == b"\x00\x00"
    assert int.from_bytes(bus.read(status, 4), "little") == (0x100 | pm.GBL_EN) << 16
    bus.write(enable, bytes(2))
    assert bus.read(enable, 2) == bytes(2)
    assert events == [] and not bus.unclaimed


def test_reset_register_and_keyboard_controller_reset():
    bus, events = _power_bus()
    bus.write(pm.RESET_PORT, bytes([0x02]))  # SYS_RST alone: Linux's first write
    assert events == []
    bus.write(pm.RESET_PORT, bytes([pm.RESET_VALUE]))
    assert events == ["reset"]
    bus.write(0x64, bytes([0xFE]))
    assert events == ["reset", "reset"]
    assert bus.read(0x64, 1) == b"\xff"  # no keyboard controller
