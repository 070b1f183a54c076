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
