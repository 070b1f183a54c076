"""The 8250/16550A UART model and the isa-debug-exit device (no I/O, no KVM)."""

from __future__ import annotations

import threading

import pytest

from osvmm.devices import debug_exit
from osvmm.devices import serial as u
from osvmm.devices.serial import Serial


class Uart:
    """A Serial with its sink and interrupt line recorded."""

    def __init__(self):
        self.out = bytearray()
        self.irqs: list[int] = []
        self.dev = Serial(self.out.extend, self.irqs.append)

    def w(self, reg: int, value: int) -> None:
        self.dev.write(reg, value)

    def r(self, reg: int) -> int:
        return self.dev.read(reg)


@pytest.fixture
def uart() -> Uart:
    return Uart()


def test_thr_writes_go_to_the_sink(uart):
    for ch in b"hi\n":
        uart.w(u.UART_TX, ch)
    assert bytes(uart.out) == b"hi\n"
    uart.w(u.UART_TX, 0x1FF)  # only the low byte of a write reaches the chip
    assert uart.out[-1] == 0xFF


def test_lsr_thre_temt_always_set_dr_only_with_data(uart):
    lsr = uart.r(u.UART_LSR)
    assert lsr & (u.UART_LSR_THRE | u.UART_LSR_TEMT) == u.UART_LSR_THRE | u.UART_LSR_TEMT
    assert not lsr & u.UART_LSR_DR
    uart.w(u.UART_TX, ord("x"))
    assert uart.r(u.UART_LSR) & u.UART_LSR_THRE
    assert uart.dev.enqueue(b"k") == 1
    assert uart.r(u.UART_LSR) & u.UART_LSR_DR
    assert uart.r(u.UART_RX) == ord("k")
    assert not uart.r(u.UART_LSR) & u.UART_LSR_DR
    uart.w(u.UART_LSR, 0)  # read-only: ignored
    assert uart.r(u.UART_LSR) == u.UART_LSR_THRE | u.UART_LSR_TEMT


def test_dlab_switches_to_the_divisor_latch(uart):
    uart.w(u.UART_IER, u.UART_IER_RDI)
    uart.dev.enqueue(b"q")
    uart.w(u.UART_LCR, u.UART_LCR_DLAB | 0x03)
    uart.w(u.UART_DLL, 0x01)  # 115200 baud
    uart.w(u.UART_DLM, 0x00)
    assert (uart.r(u.UART_DLL), uart.r(u.UART_DLM)) == (0x01, 0x00)
    assert uart.out == b"", "a DLL write must not transmit"
    assert uart.dev.fifo_len == 1, "a DLL read must not consume input"
    uart.w(u.UART_LCR, 0x03)
    assert uart.r(u.UART_IER) == u.UART_IER_RDI, "a DLM write must not change IER"
    assert uart.r(u.UART_RX) == ord("q")
    assert (uart.dev.dll, uart.dev.dlm) == (1, 0)
    assert uart.r(u.UART_LCR) == 0x03


def test_default_divisor_is_9600_baud(uart):
    uart.w(u.UART_LCR, u.UART_LCR_DLAB)
    assert uart.r(u.UART_DLL) | uart.r(u.UART_DLM) << 8 == 12


def test_scratch_register(uart):
    for value in (0x00, 0x55, 0xAA, 0xFF):
        uart.w(u.UART_SCR, value)
        assert uart.r(u.UART_SCR) == value


def test_ier_keeps_only_the_four_enable_bits(uart):
    uart.w(u.UART_IER, 0xFF)
    assert uart.r(u.UART_IER) == 0x0F


def test_iir_without_interrupts(uart):
    assert uart.r(u.UART_IIR) == u.UART_IIR_NO_INT
    uart.w(u.UART_FCR, u.UART_FCR_ENABLE_FIFO)
    assert uart.r(u.UART_IIR) == u.UART_IIR_NO_INT | u.UART_IIR_FIFO_ENABLED


def test_iir_priority_rdi_over_thri(uart):
    uart.w(u.UART_IER, u.UART_IER_RDI | u.UART_IER_THRI)
    uart.dev.enqueue(b"ab")
    assert uart.r(u.UART_IIR) == u.UART_IIR_RDI
    assert uart.r(u.UART_IIR) == u.UART_IIR_RDI, "reading IIR does not clear RDI"
    uart.r(u.UART_RX)
    uart.r(u.UART_RX)
    # With the receiver drained, the pending THRE condition shows.
    assert uart.r(u.UART_IIR) == u.UART_IIR_THRI
    assert uart.r(u.UART_IIR) == u.UART_IIR_NO_INT


def test_reading_iir_clears_thre_and_writing_thr_rearms_it(uart):
    uart.w(u.UART_IER, u.UART_IER_THRI)  # enabling ETBEI raises THRE at once
    assert uart.dev.irq_level == 1
    assert uart.r(u.UART_IIR) == u.UART_IIR_THRI
    assert uart.dev.irq_level == 0
    assert uart.r(u.UART_IIR) == u.UART_IIR_NO_INT
    uart.w(u.UART_TX, ord("a"))
    assert uart.dev.irq_level == 1
    assert uart.r(u.UART_IIR) == u.UART_IIR_THRI
    # Re-writing IER with THRI already set does not raise it again.
    uart.w(u.UART_IER, u.UART_IER_THRI)
    assert uart.r(u.UART_IIR) == u.UART_IIR_NO_INT
    # Clearing and setting ETBEI does.
    uart.w(u.UART_IER, 0)
    uart.w(u.UART_IER, u.UART_IER_THRI)
    assert uart.r(u.UART_IIR) == u.UART_IIR_THRI


def test_thre_condition_is_masked_without_etbei(uart):
    uart.w(u.UART_TX, ord("a"))
    assert uart.r(u.UART_IIR) == u.UART_IIR_NO_INT
    assert uart.irqs == []


def test_irq_called_only_on_level_changes(uart):
    uart.w(u.UART_IER, u.UART_IER_RDI)
    assert uart.irqs == []
    uart.dev.enqueue(b"a")
    uart.dev.enqueue(b"b")  # still pending: no second call
    assert uart.irqs == [1]
    uart.r(u.UART_RX)
    assert uart.irqs == [1]
    uart.r(u.UART_RX)
    assert uart.irqs == [1, 0]
    uart.r(u.UART_LSR)
    assert uart.irqs == [1, 0]


def test_out2_gates_the_interrupt_line(uart):
    uart.w(u.UART_IER, u.UART_IER_RDI)
    uart.w(u.UART_MCR, 0)  # OUT2 off
    uart.dev.enqueue(b"a")
    assert uart.irqs == []
    assert uart.r(u.UART_IIR) == u.UART_IIR_RDI, "the condition is pending all the same"
    uart.w(u.UART_MCR, u.UART_MCR_OUT2)
    assert uart.irqs == [1]
    uart.w(u.UART_MCR, 0)
    assert uart.irqs == [1, 0]


def test_fifo_capacity_bound(uart):
    data = bytes(range(100))
    taken = uart.dev.enqueue(data)
    assert taken == u.FIFO_CAPACITY == 64
    assert uart.dev.enqueue(b"more") == 0
    assert uart.dev.fifo_len == 64
    received = bytes(uart.r(u.UART_RX) for _ in range(64))
    assert received == data[:64]
    assert uart.r(u.UART_RX) == 0  # an empty receiver reads 0
    assert uart.dev.enqueue(data[taken:]) == 36


def test_rx_pops_in_order(uart):
    uart.dev.enqueue(b"abc")
    uart.dev.enqueue(b"de")
    assert bytes(uart.r(u.UART_RX) for _ in range(5)) == b"abcde"


def test_loopback_routes_tx_to_rx_and_msr_reflects_mcr(uart):
    assert uart.r(u.UART_MSR) == u.UART_MSR_DCD | u.UART_MSR_DSR | u.UART_MSR_CTS
    uart.w(u.UART_MCR, u.UART_MCR_LOOP)
    assert uart.r(u.UART_MSR) == 0
    uart.w(u.UART_TX, 0x5A)
    assert uart.out == b"", "loopback output must not reach the sink"
    assert uart.r(u.UART_LSR) & u.UART_LSR_DR
    assert uart.r(u.UART_RX) == 0x5A
    # DTR -> DSR, RTS -> CTS, OUT1 -> RI, OUT2 -> DCD.
    for mcr, msr in ((0x01, 0x20), (0x02, 0x10), (0x04, 0x40), (0x08, 0x80), (0x0F, 0xF0)):
        uart.w(u.UART_MCR, u.UART_MCR_LOOP | mcr)
        assert uart.r(u.UART_MSR) == msr, hex(mcr)
    uart.w(u.UART_MCR, 0xFF)
    assert uart.r(u.UART_MCR) == 0x1F
    uart.w(u.UART_MCR, u.UART_MCR_OUT2)
    uart.w(u.UART_TX, 0x41)
    assert uart.out == b"A"


def test_loopback_fifo_is_bounded_too(uart):
    uart.w(u.UART_MCR, u.UART_MCR_LOOP)
    for i in range(100):
        uart.w(u.UART_TX, i)
    assert uart.dev.fifo_len == u.FIFO_CAPACITY


def test_fcr_clear_receiver(uart):
    uart.w(u.UART_IER, u.UART_IER_RDI)
    uart.dev.enqueue(b"junk")
    assert uart.irqs == [1]
    uart.w(u.UART_FCR, u.UART_FCR_ENABLE_FIFO | u.UART_FCR_CLEAR_RCVR)
    assert uart.dev.fifo_len == 0
    assert not uart.r(u.UART_LSR) & u.UART_LSR_DR
    assert uart.irqs == [1, 0]
    uart.w(u.UART_FCR, u.UART_FCR_ENABLE_FIFO)  # without the clear bit: input stays
    uart.dev.enqueue(b"x")
    uart.w(u.UART_FCR, u.UART_FCR_ENABLE_FIFO)
    assert uart.dev.fifo_len == 1


def test_unknown_register_reads_ff(uart):
    assert uart.r(8) == 0xFF


def test_concurrent_enqueue_and_read_lose_nothing():
    dev = Serial(lambda b: None)
    sent = bytes(i & 0xFF for i in range(4000))
    received = bytearray()
    errors = []
    done = threading.Event()

    def producer():
        pos = 0
        while pos < len(sent) and not done.is_set():
            n = dev.enqueue(sent[pos : pos + 37])
            if not 0 <= n <= 37:
                errors.append(f"enqueue accepted {n} of 37")
            pos += n

    def consumer():
        while len(received) < len(sent) and not done.is_set():
            if dev.read(u.UART_LSR) & u.UART_LSR_DR:
                received.append(dev.read(u.UART_RX))
            if dev.fifo_len > u.FIFO_CAPACITY:
                errors.append(f"FIFO holds {dev.fifo_len} bytes")

    threads = [threading.Thread(target=f, daemon=True) for f in (producer, consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    done.set()
    assert not errors
    assert bytes(received) == sent


# -- isa-debug-exit ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "status"), [(0, 1), (1, 3), (0x2A, 0x55), (0x7F, 0xFF), (0x80, 1), (0xFF, 0xFF)]
)
def test_debug_exit_status(value, status):
    assert debug_exit.exit_status(value) == status


def test_debug_exit_device():
    seen = []
    dev = debug_exit.DebugExit(seen.append)
    assert dev.read(0) == 0xFF
    dev.write(0, 0x1_07)
    assert seen == [0x07]
    assert debug_exit.DEBUG_EXIT_PORT == 0xF4
