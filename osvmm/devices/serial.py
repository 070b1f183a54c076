"""An 8250/16550A UART model (COM1) in the manner of vm-superio: it does no I/O.

Register writes and reads come in through ``write(offset, value)`` and
``read(offset)``; transmitted bytes go to an injected ``out`` callable; the
interrupt line goes to an injected ``irq(level)`` callable, called only when
the line's level changes (an ISA IRQ on the I/O APIC is edge-triggered: a
rising edge is one interrupt). Input waits in a bounded FIFO
(FIFO_CAPACITY bytes, as vm-superio caps it after CVE-2020-27173);
``enqueue`` returns how many bytes fit, the rest are the caller's to retry.

Register names and bits are those of the 16550 datasheet and Linux's
include/uapi/linux/serial_reg.h.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

FIFO_CAPACITY = 64

# Register offsets from the base port.
UART_RX = 0  # receive buffer (read, DLAB=0)
UART_TX = 0  # transmit holding (write, DLAB=0)
UART_DLL = 0  # divisor latch low (DLAB=1)
UART_IER = 1  # interrupt enable (DLAB=0)
UART_DLM = 1  # divisor latch high (DLAB=1)
UART_IIR = 2  # interrupt identification (read)
UART_FCR = 2  # FIFO control (write)
UART_LCR = 3  # line control
UART_MCR = 4  # modem control
UART_LSR = 5  # line status
UART_MSR = 6  # modem status
UART_SCR = 7  # scratch

UART_IER_RDI = 0x01  # receive data available
UART_IER_THRI = 0x02  # transmit holding register empty
UART_IER_RLSI = 0x04  # receiver line status
UART_IER_MSI = 0x08  # modem status

UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_FIFO_ENABLED = 0xC0

UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02

UART_LCR_DLAB = 0x80

UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10

UART_LSR_DR = 0x01  # data ready
UART_LSR_THRE = 0x20  # transmit holding register empty
UART_LSR_TEMT = 0x40  # transmitter empty

UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_DCD = 0x80

DEFAULT_BAUD_DIVISOR = 12  # 9600 baud
COM1_PORT = 0x3F8
COM1_IRQ = 4


class Serial:
    """One 16550A. Thread-safe: vCPU threads and the console reader may call it."""

    def __init__(
        self,
        out: Callable[[bytes], None],
        irq: Callable[[int], None] = lambda level: None,
    ):
        self._out = out
        self._irq = irq
        self._lock = threading.Lock()
        self._fifo: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = UART_MCR_OUT2
        self.msr = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
        self.scr = 0
        self.fcr = 0
        self.dll = DEFAULT_BAUD_DIVISOR
        self.dlm = 0
        self._thr_empty_pending = False  # the THRE interrupt condition
        self._line = 0

    # -- guest side ----------------------------------------------------------
    def write(self, offset: int, value: int) -> None:
        with self._lock:
            self._write(offset, value & 0xFF)
            self._update_irq()

    def read(self, offset: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
            return value

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_TX and not dlab:
            if self.mcr & UART_MCR_LOOP:
                if len(self._fifo) < FIFO_CAPACITY:
                    self._fifo.append(value)
            else:
                self._out(bytes((value,)))
            # Transmission is instantaneous: the holding register is empty again.
            self._thr_empty_pending = True
        elif offset == UART_DLL and dlab:
            self.dll = value
        elif offset == UART_IER and not dlab:
            newly_thri = value & UART_IER_THRI and not self.ier & UART_IER_THRI
            self.ier = value & 0x0F
            if newly_thri:
                self._thr_empty_pending = True
        elif offset == UART_DLM and dlab:
            self.dlm = value
        elif offset == UART_FCR:
            self.fcr = value
            if value & UART_FCR_CLEAR_RCVR:
                self._fifo.clear()
        elif offset == UART_LCR:
            self.lcr = value
        elif offset == UART_MCR:
            self.mcr = value & 0x1F
        elif offset == UART_SCR:
            self.scr = value
        # LSR and MSR are read-only: writes are ignored, as on the chip.

    def _read(self, offset: int) -> int:
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_RX:
            if dlab:
                return self.dll
            return self._fifo.popleft() if self._fifo else 0
        if offset == UART_IER:
            return self.dlm if dlab else self.ier
        if offset == UART_IIR:
            iir = self._pending_iir()
            if iir == UART_IIR_THRI:
                # Reading IIR while it reports THRE clears that condition.
                self._thr_empty_pending = False
            if self.fcr & UART_FCR_ENABLE_FIFO:
                iir |= UART_IIR_FIFO_ENABLED
            return iir
        if offset == UART_LCR:
            return self.lcr
        if offset == UART_MCR:
            return self.mcr
        if offset == UART_LSR:
            lsr = UART_LSR_THRE | UART_LSR_TEMT
            if self._fifo:
                lsr |= UART_LSR_DR
            return lsr
        if offset == UART_MSR:
            if self.mcr & UART_MCR_LOOP:
                # Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                m = self.mcr
                return ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
            return self.msr
        if offset == UART_SCR:
            return self.scr
        return 0xFF

    def _pending_iir(self) -> int:
        if self.ier & UART_IER_RDI and self._fifo:
            return UART_IIR_RDI
        if self.ier & UART_IER_THRI and self._thr_empty_pending:
            return UART_IIR_THRI
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        # OUT2 gates the interrupt line to the PIC/I/O APIC on PC serial ports.
        level = int(self._pending_iir() != UART_IIR_NO_INT and bool(self.mcr & UART_MCR_OUT2))
        if level != self._line:
            self._line = level
            self._irq(level)

    # -- host side -------------------------------------------------------------
    def enqueue(self, data: bytes) -> int:
        """Offer input bytes; returns how many were accepted (the FIFO is bounded)."""
        with self._lock:
            room = FIFO_CAPACITY - len(self._fifo)
            taken = data[:room]
            self._fifo.extend(taken)
            self._update_irq()
            return len(taken)

    @property
    def fifo_len(self) -> int:
        return len(self._fifo)

    # -- snapshots (pure: plain values in, plain values out) --------------------------
    def state(self) -> dict:
        """The registers, the receive FIFO and the pending THRE interrupt."""
        with self._lock:
            return {
                "ier": self.ier,
                "lcr": self.lcr,
                "mcr": self.mcr,
                "msr": self.msr,
                "scr": self.scr,
                "fcr": self.fcr,
                "dll": self.dll,
                "dlm": self.dlm,
                "rx_fifo": bytes(self._fifo),
                "thr_empty_pending": self._thr_empty_pending,
            }

    def restore(self, state: dict) -> None:
        """Take the registers and FIFO of ``state()``; the interrupt line is raised
        anew if an interrupt is pending (the line starts low in a new VM)."""
        with self._lock:
            for reg in ("ier", "lcr", "mcr", "msr", "scr", "fcr", "dll", "dlm"):
                setattr(self, reg, int(state[reg]) & 0xFF)
            self._fifo = deque(bytes(state["rx_fifo"])[:FIFO_CAPACITY])
            self._thr_empty_pending = bool(state["thr_empty_pending"])
            self._line = 0
            self._update_irq()

    @property
    def irq_level(self) -> int:
        return self._line
