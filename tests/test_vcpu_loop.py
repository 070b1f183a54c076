"""The exit loop with a scripted vCPU (no /dev/kvm): dispatch, string I/O, faults, stop."""

from __future__ import annotations

import pytest

from osvmm.devices.bus import PortBus
from osvmm.devices.mmio import MmioBus
from osvmm.errors import GuestFault
from osvmm.kvm import exits, structs
from osvmm.vmm.vcpu import VcpuThread

REASONS = {
    exits.Shutdown: structs.KVM_EXIT_SHUTDOWN,
    exits.FailEntry: structs.KVM_EXIT_FAIL_ENTRY,
    exits.InternalError: structs.KVM_EXIT_INTERNAL_ERROR,
    exits.SystemEvent: structs.KVM_EXIT_SYSTEM_EVENT,
    exits.DirtyRingFull: structs.KVM_EXIT_DIRTY_RING_FULL,
    exits.Unhandled: 3,
}


class Recorder:
    def __init__(self):
        self.writes = []

    def write(self, offset, value):
        self.writes.append((offset, value))

    def read(self, offset):
        return 0x40 + offset


class ScriptedVcpu:
    """Plays the scripted exits through run_header()/decode() as KVM_RUN would, then
    stops the loop. Single-byte port I/O exits put their data in the fake kvm_run
    mapping at DATA_OFF, as KVM does, so the fast path sees them too."""

    DATA_OFF = 0x1000

    def __init__(self, script, thread_box):
        self.script = list(script)
        self.box = thread_box
        self.io_in = []
        self.run_mmap = bytearray(0x2000)
        self._current = None

    def run_header(self):
        if not self.script:
            self.box[0].stop_requested = True
            return (structs.KVM_EXIT_INTR, 0, 0, 0, 0, 0)
        ex = self._current = self.script.pop(0)
        if isinstance(ex, exits.IoOut):
            n = len(ex.data)
            self.run_mmap[self.DATA_OFF : self.DATA_OFF + n] = ex.data
            return (structs.KVM_EXIT_IO, 1, ex.size, ex.port, n // ex.size, self.DATA_OFF)
        if isinstance(ex, exits.IoIn):
            return (structs.KVM_EXIT_IO, 0, ex.size, ex.port, ex.count, self.DATA_OFF)
        return (REASONS[type(ex)], 0, 0, 0, 0, 0)

    def decode(self, reason):
        ex = self._current
        if isinstance(ex, exits.IoIn):
            return exits.IoIn(ex.port, ex.size, ex.count, self.DATA_OFF)
        return ex

    def complete_io_in(self, ex, data):
        self.io_in.append(bytes(data))

    def complete_mmio_read(self, data):
        self.io_in.append(data)

    rip, cs_base = 0x1234, 0

    def get_regs(self):
        class R:
            rip = self.rip

        return R()

    def get_sregs(self):
        class S:
            class cs:
                base = self.cs_base

        return S()

    def set_immediate_exit(self, value):
        pass


class Machine:
    def __init__(self):
        self.faults = []
        self.finished = []
        self.resets = []

    def fault(self, err):
        self.faults.append(err)

    def finish(self, status, reason):
        self.finished.append((status, reason))

    def reset(self, index):
        self.resets.append(index)


def run_script(script, rip=0x1234, cs_base=0, hooks=None, ring_full=None):
    bus = PortBus()
    dev = Recorder()
    bus.register(0x3F8, 8, dev)
    machine = Machine()
    box = [None]
    vcpu = ScriptedVcpu(script, box)
    vcpu.rip, vcpu.cs_base = rip, cs_base
    t = VcpuThread(vcpu, 0, bus, MmioBus(), machine)
    t.port_hooks.update(hooks or {})
    t.dirty_ring_full = ring_full
    box[0] = t
    t._main()  # run on this thread
    return dev, vcpu, machine, t


def test_a_hooked_port_sees_single_word_and_dword_accesses_on_the_fast_path():
    seen = []

    def hook(vcpu, direction, size, data_offset):
        seen.append((direction, size, data_offset))

    script = [exits.IoOut(0x510, 4, b"\1\0\0\0"), exits.IoIn(0x510, 2, 1, 0)]
    _, vcpu, machine, t = run_script(script, hooks={0x510: hook})
    assert seen == [(1, 4, vcpu.DATA_OFF), (0, 2, vcpu.DATA_OFF)]
    assert t.io_counts == [1, 1] and not machine.faults
    assert t.handled_counts() == {"Interrupted": 1, "IoIn": 1, "IoOut": 1}


def test_byte_and_string_accesses_to_a_hooked_port_go_to_the_port_bus():
    seen = []
    script = [exits.IoOut(0x510, 1, b"\1"), exits.IoOut(0x510, 4, b"\1\0\0\0" * 2)]
    _, _, _, t = run_script(script, hooks={0x510: lambda *a: seen.append(a)})
    assert seen == []
    assert t.pio.unclaimed[0x510] == 3  # one byte, then two dwords of a rep outsl


def test_rep_outs_writes_every_byte_to_the_same_port():
    dev, _, machine, _ = run_script([exits.IoOut(0x3F8, 1, b"abc")])
    assert dev.writes == [(0, ord("a")), (0, ord("b")), (0, ord("c"))]
    assert not machine.faults


def test_rep_ins_reads_the_same_port_count_times():
    _, vcpu, _, _ = run_script([exits.IoIn(0x3FD, 1, 3, 0)])
    assert vcpu.io_in == [bytes([0x45, 0x45, 0x45])]


def test_single_byte_in_takes_the_fast_path():
    _, vcpu, _, t = run_script([exits.IoIn(0x3FD, 1, 1, 0), exits.IoIn(0x81, 1, 1, 0)])
    assert vcpu.run_mmap[vcpu.DATA_OFF] == 0xFF  # the unclaimed port read last
    assert t.io_counts == [2, 0]
    assert t.pio.unclaimed[0x81] == 1


def test_single_byte_out_reaches_the_device():
    dev, _, _, t = run_script([exits.IoOut(0x3F9, 1, b"\x07")])
    assert dev.writes == [(1, 7)]
    assert t.handled_counts() == {"Interrupted": 1, "IoOut": 1}  # the stop is an exit too


def test_word_out_spans_consecutive_ports():
    dev, _, _, _ = run_script([exits.IoOut(0x3F8, 2, b"\x01\x02")])
    assert dev.writes == [(0, 1), (1, 2)]


@pytest.mark.parametrize(
    ("ex", "text"),
    [
        (exits.Shutdown(), "triple fault"),
        (exits.FailEntry(0x21, 0), "VM entry failed (hardware reason 0x21)"),
        (
            exits.InternalError(1, (1, 0xCC01, 0, 0)),
            "emulation failure, instruction bytes cc",
        ),
        (exits.Unhandled(3), "unhandled exit reason hypercall"),
    ],
)
def test_faults_are_reported_with_vcpu_and_rip(ex, text):
    _, _, machine, t = run_script([ex])
    assert len(machine.faults) == 1
    fault = machine.faults[0]
    assert isinstance(fault, GuestFault)
    assert fault.vcpu == 0 and fault.rip == 0x1234
    assert text in str(fault)
    assert t.state == VcpuThread.FINISHED


def test_a_triple_fault_reported_in_the_reset_state_says_the_registers_are_lost():
    # KVM on AMD INITs the vCPU before it returns KVM_EXIT_SHUTDOWN: rip 0xfff0 then
    # is the reset vector, not where the guest faulted.
    _, _, machine, _ = run_script([exits.Shutdown()], rip=0xFFF0, cs_base=0xFFFF0000)
    (fault,) = machine.faults
    assert str(fault) == (
        "guest fault on vcpu 0 at rip 0xfff0: triple fault (shutdown; KVM reset the vCPU "
        "before reporting it, as it does on AMD: the registers at the fault are lost)"
    )
    # Real mode code that faults at 0xfff0 with another CS is reported plainly.
    _, _, machine, _ = run_script([exits.Shutdown()], rip=0xFFF0, cs_base=0xF0000)
    assert str(machine.faults[0]).endswith("at rip 0xfff0: triple fault (shutdown)")


def test_handled_exits_are_counted_by_kind():
    script = [exits.IoOut(0x80, 1, b"\0")] * 3 + [exits.IoIn(0x80, 1, 1, 0)]
    script += [exits.IoOut(0x80, 1, b"ab")]  # rep outsb: the slow path
    _, _, _, t = run_script(script)
    assert t.handled_counts() == {"Interrupted": 1, "IoIn": 1, "IoOut": 4}


def test_system_event_reset_asks_the_machine_to_reset():
    _, _, machine, _ = run_script([exits.SystemEvent(2, ())])
    assert machine.resets == [0]


def test_a_full_dirty_ring_is_emptied_on_the_vcpu_thread_and_the_vcpu_runs_on():
    emptied = []
    script = [exits.DirtyRingFull(), exits.IoOut(0x3F8, 1, b"A"), exits.DirtyRingFull()]
    dev, _, machine, t = run_script(script, ring_full=lambda: emptied.append(1))
    assert emptied == [1, 1]
    assert dev.writes == [(0, 0x41)]  # it ran on after the first
    assert machine.faults == []
    assert t.handled_counts()["DirtyRingFull"] == 2


def test_a_dirty_ring_full_exit_without_a_ring_is_a_fault_not_a_hang():
    _, _, machine, _ = run_script([exits.DirtyRingFull()])
    assert len(machine.faults) == 1 and "dirty ring full" in str(machine.faults[0])


def test_a_gate_holds_its_waiters_until_it_opens_then_lets_every_one_through():
    import threading
    import time

    from osvmm.vmm.vcpu import Gate

    gate = Gate()
    assert not gate.is_set()
    t0 = time.monotonic()
    assert gate.wait(0.05) is False  # shut: a timed wait gives up
    assert time.monotonic() - t0 >= 0.04
    passed: list[int] = []
    waiters = [
        threading.Thread(target=lambda i=i: passed.append(i) if gate.wait() else None)
        for i in range(3)
    ]
    for t in waiters:
        t.start()
    time.sleep(0.05)
    assert passed == []  # all held
    gate.set()
    gate.set()  # opening it again changes nothing
    for t in waiters:
        t.join(5)
    assert sorted(passed) == [0, 1, 2] and gate.is_set()
    assert gate.wait(0) and gate.wait()  # open: no wait, later waiters too
