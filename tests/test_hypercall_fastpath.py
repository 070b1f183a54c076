"""The live hypercall hook's fast path (osvmm/hypercall/live.py ``_sync_hook``)
decides every call exactly as ``monitor.dispatch`` does: the hook inlines the
dispatcher's caller and call-number checks and goes straight to the handler
table. Driven without KVM: registers in a kvm_run-sized mapping, as KVM leaves
them at an exit."""

from __future__ import annotations

import mmap
import struct
import types
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from osvmm.hypercall import abi, monitor
from osvmm.hypercall.live import LiveMonitor
from osvmm.hypercall.monitor import RUNNING, STOPPED, ChannelConfig, MonitorConfig
from osvmm.hypercall.monitor import PartitionConfig as Member
from osvmm.kvm import exits

MiB = 1 << 20
CONFIG = MonitorConfig(
    [
        Member("a", [(0, 64 * MiB)], doorbells=("b",), privileged=True),
        Member("b", [(0, 64 * MiB)], vcpus=2),
    ],
    [ChannelConfig("link", 2 * MiB, {"a": "rw", "b": "ro"})],
)
_REGS = struct.Struct("<6Q")  # rax, rbx, rcx, rdx, rsi, rdi: kvm_regs' first fields

U64 = st.one_of(
    st.sampled_from([0, 1, 2, 3, 31, 32, 255, 256, 4096, 64 * MiB, 2**32 - 1, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)


def _live(lifecycle: tuple[str, str]) -> tuple[LiveMonitor, list]:
    """A LiveMonitor whose effects are recorded, not carried out (no partition is bound)."""
    live = LiveMonitor(CONFIG, console=lambda pid, data: None)
    live.state = replace(live.state, lifecycle=lifecycle)
    applied: list = []
    live._apply = lambda effects: applied.extend(effects) or ()
    live._reader = lambda pid, gpa, length: b"x" * length
    return live, applied


def _hook_call(live: LiveMonitor, pid: int, rax: int, args) -> int:
    mm = mmap.mmap(-1, 4096)
    vcpu = types.SimpleNamespace(sync=exits.SyncRegs(mm))
    a0, a1, a2, a3 = args
    _REGS.pack_into(mm, exits._SYNC_REGS_OFF, rax, a2, a3, 0, a1, a0)
    live._sync_hook(pid)(vcpu, 1, 4, 0)
    return vcpu.sync.first()[0]


@settings(max_examples=400, deadline=None)
@given(
    pid=st.sampled_from([0, 1]),
    nr=st.one_of(st.integers(0, len(abi.HYPERCALLS) + 1), st.integers(0, 2**64 - 1)),
    args=st.tuples(U64, U64, U64, U64),
    lifecycle=st.sampled_from([(RUNNING, RUNNING), (RUNNING, STOPPED), (STOPPED, RUNNING)]),
)
def test_the_hook_decides_each_call_as_the_dispatcher_does(pid, nr, args, lifecycle):
    live, applied = _live(lifecycle)
    before = live.state
    reader = live._reader
    state, result, effects = monitor.dispatch(before, pid, nr & 0xFFFFFFFF, args, reader)
    got = _hook_call(live, pid, nr, args)
    assert got == result & (2**64 - 1)
    assert live.state == state  # the same transition
    assert tuple(applied) == effects
    key = (pid, nr & 0xFFFFFFFF, result if result < 0 else 0)
    assert live.stats.by_partition == {key: 1}


def test_counts_by_call_and_by_error_come_from_one_counter():
    live, _ = _live((RUNNING, STOPPED))
    _hook_call(live, 0, abi.CONSOLE_WRITE, (0, 0, 0, 0))
    _hook_call(live, 0, abi.CONSOLE_WRITE, (0, 0, 0, 0))
    _hook_call(live, 1, abi.CONSOLE_WRITE, (0, 0, 0, 0))  # stopped: ESRCH
    _hook_call(live, 0, 999, (0, 0, 0, 0))  # no such call: ENOSYS
    assert live.stats.calls == {abi.CONSOLE_WRITE: 3, 999: 1}
    assert live.stats.errors == {-monitor.ESRCH: 1, -monitor.ENOSYS: 1}


class _Lock:
    """The monitor's lock, watched: how often it was taken, and ``before``
    run as it is taken (another thread's call that got there first)."""

    def __init__(self, before=None):
        self.taken = 0
        self.before = before

    def __enter__(self):
        self.taken += 1
        if self.before is not None:
            self.before()

    def __exit__(self, *exc):
        return False


def test_a_call_that_changes_nothing_takes_no_lock_and_one_that_does_takes_it():
    live, applied = _live((RUNNING, RUNNING))
    live.lock = _Lock()
    assert _hook_call(live, 1, abi.CONSOLE_WRITE, (0, 0, 0, 0)) == 0  # nothing to write
    assert _hook_call(live, 1, abi.DOORBELL, (0, 0, 32, 0)) == 2**64 - monitor.EPERM
    assert live.lock.taken == 0 and applied == []
    assert _hook_call(live, 0, abi.CHANNEL_ATTACH, (0, 0, 0, 0)) == 0xD000_0000  # its gpa
    assert _hook_call(live, 0, abi.CONSOLE_WRITE, (0, 8, 0, 0)) == 8  # an effect
    assert live.lock.taken == 2 and len(applied) == 2
    assert live.state.attached(0)


def test_a_step_is_taken_again_on_the_state_another_call_changed_meanwhile():
    live, applied = _live((RUNNING, RUNNING))
    stopped = replace(live.state, lifecycle=(STOPPED, RUNNING))

    def the_supervisor_stops_it():  # between the hook's read and its lock
        live.state = stopped

    live.lock = _Lock(the_supervisor_stops_it)
    assert _hook_call(live, 0, abi.CHANNEL_ATTACH, (0, 0, 0, 0)) == 2**64 - monitor.ESRCH
    assert live.state is stopped and not live.state.attached(0)  # the stale step not applied
    assert applied == []
    assert live.stats.by_partition == {(0, abi.CHANNEL_ATTACH, -monitor.ESRCH): 1}


def test_each_vcpu_counts_in_its_own_tally_and_the_views_add_them_up():
    live, _ = _live((RUNNING, RUNNING))
    mm = mmap.mmap(-1, 4096)
    vcpu = types.SimpleNamespace(sync=exits.SyncRegs(mm))
    hooks = [live._sync_hook(1, 0), live._sync_hook(1, 1)]
    for hook, n in zip(hooks, (2, 3), strict=True):
        for _ in range(n):
            _REGS.pack_into(mm, exits._SYNC_REGS_OFF, abi.CONSOLE_WRITE, 0, 0, 0, 0, 0)
            hook(vcpu, 1, 4, 0)
    assert live.stats.tallies[1, 0].ok[abi.CONSOLE_WRITE] == 2
    assert live.stats.tallies[1, 1].ok[abi.CONSOLE_WRITE] == 3
    assert live.stats.by_partition == {(1, abi.CONSOLE_WRITE, 0): 5}
    assert live.stats.calls == {abi.CONSOLE_WRITE: 5} and not live.stats.errors
