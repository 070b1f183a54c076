"""Device models' state() and restore(): plain values out, the same device back in
(pure: no KVM)."""

from __future__ import annotations

from osvmm.devices import serial as uart
from osvmm.devices.pm_timer import PmTimer
from osvmm.devices.power import Pm1Control, Pm1Event, ResetControl
from osvmm.devices.rtc import RTC_REG_B, RTC_SET, Rtc
from osvmm.snapshot import format as fmt


def through_a_file(state: dict) -> dict:
    """What a snapshot gives back: the state stored and read again."""
    return fmt.decode(fmt.encode({"s": state}))["s"]


def test_serial_registers_fifo_and_pending_interrupt_come_back():
    levels = []
    a = uart.Serial(lambda data: None, irq=levels.append)
    a.write(uart.UART_LCR, uart.UART_LCR_DLAB)
    a.write(uart.UART_DLL, 1)
    a.write(uart.UART_LCR, 0x03)
    a.write(uart.UART_FCR, uart.UART_FCR_ENABLE_FIFO)
    a.write(uart.UART_SCR, 0x5A)
    a.write(uart.UART_IER, uart.UART_IER_RDI)
    a.enqueue(b"typed")
    assert a.irq_level == 1
    state = through_a_file(a.state())

    b_levels = []
    b = uart.Serial(lambda data: None, irq=b_levels.append)
    b.restore(state)
    assert b_levels == [1]  # the pending receive interrupt is raised in the new VM
    assert b.state() == a.state()
    assert bytes(b.read(uart.UART_RX) for _ in range(5)) == b"typed"
    assert b.read(uart.UART_SCR) == 0x5A
    b.write(uart.UART_LCR, uart.UART_LCR_DLAB)
    assert b.read(uart.UART_DLL) == 1


def test_serial_output_after_restore_goes_to_the_new_sink():
    out = []
    a = uart.Serial(lambda data: None)
    b = uart.Serial(out.append)
    b.restore(through_a_file(a.state()))
    b.write(uart.UART_TX, ord("x"))
    assert out == [b"x"]


def test_rtc_cmos_index_and_offset_come_back():
    now = [1_700_000_000.0]
    a = Rtc(lambda: now[0])
    a.write_register(0x0F, 0x0A)  # the shutdown status byte
    a.write_register(RTC_REG_B, a.read_register(RTC_REG_B) | RTC_SET)
    a.write_register(0x09, 0x30)  # year 2030 (BCD)
    a.write_register(RTC_REG_B, a.read_register(RTC_REG_B) & ~RTC_SET)
    a.write(0, 0x0F)
    b = Rtc(lambda: now[0] + 100)
    b.restore(through_a_file(a.state()))
    assert b.read(1) == 0x0A
    assert b.offset == a.offset and b.guest_time() == a.guest_time() + 100  # wall time goes on


def test_pm_timer_goes_on_from_its_count():
    t = [5_000_000_000]
    a = PmTimer(lambda: t[0])
    t[0] += 1_000_000  # 1 ms
    count = a.count()
    t2 = [99_000_000_000]
    b = PmTimer(lambda: t2[0])
    b.restore(through_a_file(a.state()))
    assert b.count() == count
    t2[0] += 1_000_000
    assert b.count() > count


def test_power_registers_come_back():
    ev, ctl, rst = Pm1Event(), Pm1Control(lambda: None), ResetControl(lambda: None)
    ev.write(2, 0x21)
    ctl.write(0, 0x05)
    rst.write(0, 0x02)
    ev2, ctl2, rst2 = Pm1Event(), Pm1Control(lambda: None), ResetControl(lambda: None)
    for old, new in ((ev, ev2), (ctl, ctl2), (rst, rst2)):
        new.restore(through_a_file(old.state()))
        assert new.state() == old.state()
