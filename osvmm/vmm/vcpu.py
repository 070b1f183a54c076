"""The vCPU thread: one host thread per vCPU running the exit loop.

States (the terminal one is marked *):

    CREATED --start()--> RUNNING --guest stops / VMM stops it--> FINISHED*

``start(gate)`` starts the host thread at once but holds it before its first
KVM_RUN until the gate (a ``Gate``) opens: a partition kept ready for
its next boot has its vCPU threads made, named and pinned ahead of the start.
A stop of a vCPU held at its gate takes effect when the gate opens.
``on_enter``, when set, is called on the thread once it is past the gate, just
before its first KVM_RUN (the partition's start waits for it: see
partition.py ``start``).

Every exit is handled on the vCPU's own thread; the port-I/O path is kept
short because on a real host it is the VMM's whole per-exit cost. Stopping a
vCPU from another thread sets ``immediate_exit`` in its kvm_run and sends the
thread SIGUSR1, so a KVM_RUN in progress returns at once (EINTR).

Parking holds a running vCPU out of KVM_RUN while the VMM changes the VM under
it (its memslots): ``park()`` kicks it the same way and returns once the
thread waits in the interrupted-exit path (off the fast path); ``unpark()``
lets it run on. A stop releases a parked vCPU.

A write into guest RAM that KVM maps read-only (vmm/memslots.py) exits as an
MMIO write; ``ram_write(thread, addr, data)``, when set, sees it first and
returns True when the address was guest RAM it handled (the write monitor).

With KVM's dirty ring (vmm/dirty_ring.py) a vCPU whose ring is full exits with
KVM_EXIT_DIRTY_RING_FULL; ``dirty_ring_full()`` empties the rings on the vCPU's
thread before it runs again (counted in ``handled`` as DirtyRingFull).
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from collections import Counter

from osvmm.errors import GuestFault, KvmError, VmmBug
from osvmm.kvm.exits import (
    DirtyRingFull,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unhandled,
)
from osvmm.kvm.structs import KVM_EXIT_INTR, KVM_EXIT_IO, KVM_SYSTEM_EVENT_RESET

KICK_SIGNAL = signal.SIGUSR1
# The state INIT leaves a vCPU in: what KVM on AMD reports after a triple fault.
RESET_RIP, RESET_CS_BASE = 0xFFF0, 0xFFFF0000
SHUTDOWN_RESET_REASON = (
    "triple fault (shutdown; KVM reset the vCPU before reporting it, as it does on AMD: "
    "the registers at the fault are lost)"
)
_kick_installed = False


def install_kick_handler() -> None:
    """Install a do-nothing SIGUSR1 handler so the signal interrupts KVM_RUN (main thread)."""
    global _kick_installed
    if not _kick_installed and threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        _kick_installed = True


class Gate:
    """A gate threads wait at until it opens, once (threading.Event's ``set``,
    ``is_set`` and ``wait``). It is one lock held while the gate is shut: a
    waiter let go returns straight from the lock's acquire, where an Event's
    waiter, woken, must then take the Event's condition lock (still held by the
    thread that set it) before it returns, a second wake-up on the start path."""

    __slots__ = ("_lock", "_guard", "_open")

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._guard = _thread.allocate_lock()  # one opener at a time
        self._open = False

    def set(self) -> None:
        with self._guard:
            if not self._open:
                self._open = True
                self._lock.release()

    def is_set(self) -> bool:
        return self._open

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the gate is open (at most ``timeout`` s); whether it is."""
        if self._open:
            return True
        if self._lock.acquire(timeout=-1 if timeout is None else timeout):
            self._lock.release()  # the next waiter passes too
            return True
        return self._open


class VcpuThread:
    CREATED, RUNNING, FINISHED = "created", "running", "finished"

    def __init__(self, vcpu, index: int, pio, mmio, machine):
        """``pio``: the PortBus; ``mmio``: an object with read(addr, len)/write(addr, data);
        ``machine``: what is told about the end of the run (``finish``/``fault``/``reset``)."""
        self.vcpu = vcpu
        self.index = index
        self.pio = pio
        self.mmio = mmio
        self.machine = machine
        self.state = self.CREATED
        self.handled = Counter()  # exits the VMM handled on the slow path, by kind
        self.io_counts = [0, 0]  # fast-path port I/O exits: [in, out]
        # port -> fn(vcpu, direction, size, data_offset): single 2- or 4-byte
        # accesses to ``port`` that need the vCPU itself (its registers: the
        # hypercall port), on the fast path beside single-byte port I/O. The hook
        # completes an ``in`` itself (the data goes to the kvm_run mapping at
        # data_offset). Byte and string accesses to the port go to the port bus.
        self.port_hooks: dict = {}
        # fn(thread, addr, data) -> bool: writes into read-only guest RAM (see above).
        self.ram_write = None
        # fn(): empties the VM's dirty rings after KVM_EXIT_DIRTY_RING_FULL (vmm/dirty_ring.py).
        self.dirty_ring_full = None
        self.stop_requested = False
        self._park_wanted = False
        self._parked = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"vcpu{index}", daemon=True)
        self.on_start = None  # optional callable run first on the thread (pinning)
        self.on_enter = None  # optional callable run once past the gate, before KVM_RUN
        self._gate: Gate | None = None

    def start(self, gate: Gate | None = None) -> None:
        """Start the thread; with ``gate``, it runs ``on_start`` and then waits for the
        gate to open before it enters the guest (a partition made ready ahead of
        its start: opening the gate is all that start has left to do)."""
        self.state = self.RUNNING
        self._gate = gate
        self._thread.start()

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN and stop (from any thread)."""
        self.stop_requested = True
        self._release.set()
        self._interrupt()

    def park(self, timeout: float = 10) -> bool:
        """Hold the running vCPU out of KVM_RUN (from another thread); returns once
        it is held, False when it is not running (nothing to hold: not started yet,
        held at its gate, or ended)."""
        held = self._gate is not None and not self._gate.is_set()
        if held or not self._thread.is_alive() or self.stop_requested:
            return False  # held at its gate, not started, or ended: not in KVM_RUN
        self._parked.clear()
        self._release.clear()
        self._park_wanted = True
        self._interrupt()
        deadline = time.monotonic() + timeout
        while not self._parked.wait(0.05):
            if not self._thread.is_alive() or self.stop_requested:
                return False
            if time.monotonic() > deadline:
                raise VmmBug(f"vcpu {self.index} did not leave KVM_RUN in {timeout} s")
            self._interrupt()
        return True

    def unpark(self) -> None:
        self._park_wanted = False
        self._release.set()

    def _park(self) -> None:
        """On the vCPU thread, out of KVM_RUN: wait until unparked (or stopped)."""
        self.vcpu.set_immediate_exit(False)
        if self.stop_requested:
            self.vcpu.set_immediate_exit(True)
            return
        self._parked.set()
        self._release.wait()

    def _interrupt(self) -> None:
        self.vcpu.set_immediate_exit(True)
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident is not None:  # a vCPU never started has nothing to join
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            if self.on_start is not None:
                self.on_start()
            if self._gate is not None:
                self._gate.wait()
            if self.on_enter is not None:
                self.on_enter()
            self._loop()
        except GuestFault as fault:
            self.machine.fault(fault)
        except KvmError as err:
            self.machine.fault(err)
        except Exception as err:  # noqa: BLE001 - a VMM bug must still stop the machine
            self.machine.fault(VmmBug.from_exception(f"vcpu {self.index}", err))
        finally:
            self.state = self.FINISHED

    def _loop(self) -> None:
        # The fast path handles single-byte port I/O, most of what a bare-metal or
        # booting guest exits for, from one unpack of kvm_run and one dict lookup,
        # and single accesses to a hooked port (the hypercall port: one more dict
        # lookup and the hook); every other exit is decoded by exits.decode_exit
        # and handled below.
        vcpu = self.vcpu
        run_header = vcpu.run_header
        mm = vcpu.run_mmap
        ports = self.pio.byte_handlers()
        unclaimed = self.pio.unclaimed
        io_counts = self.io_counts
        hooks = self.port_hooks
        while not self.stop_requested:
            reason, direction, size, port, count, off = run_header()
            if reason == KVM_EXIT_IO and count == 1:
                if size == 1:
                    io_counts[direction] += 1
                    entry = ports.get(port)
                    if direction:  # out
                        if entry is None:
                            unclaimed[port] += 1
                        else:
                            entry[0](entry[2], mm[off])
                    elif entry is None:
                        unclaimed[port] += 1
                        mm[off] = 0xFF
                    else:
                        mm[off] = entry[1](entry[2])
                    continue
                hook = hooks.get(port)
                if hook is not None:
                    io_counts[direction] += 1
                    hook(vcpu, direction, size, off)
                    continue
            if reason == KVM_EXIT_INTR:
                self.handled[Interrupted] += 1
                if self._park_wanted:
                    self._park()
                continue
            self._slow_exit(vcpu.decode(reason))

    def _slow_exit(self, ex) -> None:
        kind = type(ex)
        self.handled[kind] += 1
        if kind is IoOut:
            if len(ex.data) == ex.size:
                self.pio.write(ex.port, ex.data)
            else:  # rep outs: count accesses, all to the same port
                for i in range(0, len(ex.data), ex.size):
                    self.pio.write(ex.port, ex.data[i : i + ex.size])
        elif kind is IoIn:
            data = b"".join(self.pio.read(ex.port, ex.size) for _ in range(ex.count))
            self.vcpu.complete_io_in(ex, data)
        elif kind is MmioWrite:
            if self.ram_write is None or not self.ram_write(self, ex.addr, ex.data):
                self.mmio.write(ex.addr, ex.data)
        elif kind is MmioRead:
            self.vcpu.complete_mmio_read(self.mmio.read(ex.addr, ex.length))
        elif kind is Shutdown:
            raise self._shutdown_fault()
        elif kind is InternalError:
            raise self._fault(ex.describe())
        elif kind is FailEntry:
            raise self._fault(
                f"VM entry failed (hardware reason {ex.hardware_entry_failure_reason:#x})"
            )
        elif kind is SystemEvent:
            self.stop_requested = True
            if ex.type == KVM_SYSTEM_EVENT_RESET:
                self.machine.reset(self.index)
            else:
                self.machine.finish(0, f"system event {ex.type} on vcpu {self.index}")
        elif kind is Hlt:
            # Only without an in-kernel LAPIC; osvmm always has one.
            raise self._fault("hlt exit without an in-kernel irqchip")
        elif kind is DirtyRingFull:
            if self.dirty_ring_full is None:
                raise self._fault("dirty ring full, and this VM has no dirty ring to empty")
            self.dirty_ring_full()  # then run again: KVM lets the vCPU on once reset
        elif kind is Unhandled:
            raise self._fault(f"unhandled exit reason {ex.name}")

    def handled_counts(self) -> dict[str, int]:
        """Exits that reached the VMM, by kind (fast-path port I/O included)."""
        counts = {k.__name__: n for k, n in self.handled.items()}
        counts["IoIn"] = counts.get("IoIn", 0) + self.io_counts[0]
        counts["IoOut"] = counts.get("IoOut", 0) + self.io_counts[1]
        return {k: n for k, n in sorted(counts.items()) if n}

    def _fault(self, reason: str) -> GuestFault:
        try:
            rip = self.vcpu.get_regs().rip
        except KvmError:
            rip = 0
        return GuestFault(self.index, rip, reason)

    def _shutdown_fault(self) -> GuestFault:
        """A triple fault. KVM on AMD puts the vCPU through INIT before it reports the
        shutdown (the VMCB is undefined after one), so the registers read then are the
        reset state, rip 0xfff0 with CS base 0xffff0000: say so, not blame 0xfff0."""
        fault = self._fault("triple fault (shutdown)")
        try:
            cs_base = self.vcpu.get_sregs().cs.base
        except KvmError:
            return fault
        if fault.rip == RESET_RIP and cs_base == RESET_CS_BASE:
            return GuestFault(self.index, fault.rip, SHUTDOWN_RESET_REASON)
        return fault
