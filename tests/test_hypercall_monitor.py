"""Each hypercall's results, errors and effects in the pure monitor."""

from __future__ import annotations

import pytest

from osvmm.arch.x86 import layout
from osvmm.errors import ConfigError
from osvmm.hypercall import abi
from osvmm.hypercall.abi import (
    EBUSY,
    EFAULT,
    EINVAL,
    ENOENT,
    ENOSPC,
    ENOSYS,
    EPERM,
    ESRCH,
    ControlOp,
)
from osvmm.hypercall.monitor import (
    RUNNING,
    STOPPED,
    Attachment,
    ChannelConfig,
    ConsoleWrite,
    MapChannel,
    MonitorConfig,
    MonitorState,
    PartitionConfig,
    PartitionLifecycle,
    RaiseInterrupt,
    UnmapChannel,
    WriteGuest,
    step,
)

MiB, GiB = layout.MiB, layout.GiB


def ram(memory: int) -> tuple[tuple[int, int], ...]:
    """A partition's RAM ranges as its Machine places them."""
    return tuple(layout.ram_regions(memory))


A2 = PartitionConfig("A", ram(2 * MiB))
U64_MAX = (1 << 64) - 1
A, B, C = 0, 1, 2
WIN = layout.CHANNEL_WINDOW_START


def config() -> MonitorConfig:
    return MonitorConfig(
        partitions=[
            PartitionConfig("A", ram(2 * MiB), vcpus=1, privileged=True, doorbells=["B"]),
            PartitionConfig("B", ram(4 * MiB), vcpus=2, doorbells=["C"]),
            PartitionConfig("C", ram(3 * GiB + 2 * MiB), vcpus=3),
        ],
        channels=[
            ChannelConfig("ch0", 0x2000, {"A": "rw", "B": "ro"}),
            ChannelConfig("ch1", 0x1000, {"B": "rw", "C": "rw"}),
        ],
    )


@pytest.fixture
def s0() -> MonitorState:
    return MonitorState.from_config(config())


def call(state, caller, nr, *args):
    return step(state, caller, nr, tuple(args))


# --- configuration -----------------------------------------------------------


def test_topology_ids_slots_and_ram(s0):
    parts, chans = s0.topology.partitions, s0.topology.channels
    assert [p.name for p in parts] == ["A", "B", "C"]
    assert parts[C].ram == ((0, 3 * GiB), (4 * GiB, 2 * MiB))
    assert [(c.gpa, c.size) for c in chans] == [(WIN, 0x2000), (WIN + 0x2000, 0x1000)]
    assert chans[0].members == {A: True, B: False}
    assert s0.lifecycle == (RUNNING,) * 3 and not s0.attachments


@pytest.mark.parametrize(
    "bad",
    [
        MonitorConfig([]),
        MonitorConfig([PartitionConfig("A", ram(2 * MiB)), PartitionConfig("A", ram(2 * MiB))]),
        MonitorConfig([PartitionConfig("A", ram(2 * MiB + 1))]),
        MonitorConfig([PartitionConfig("A", ())]),  # no RAM at all
        MonitorConfig([PartitionConfig("A", ram(2 * MiB), vcpus=0)]),
        MonitorConfig([PartitionConfig("A", ram(2 * MiB), doorbells=["Z"])]),
        MonitorConfig(
            [
                PartitionConfig("A", ram(2 * MiB), privileged=True),
                PartitionConfig("B", ram(2 * MiB), privileged=True),
            ]
        ),
        MonitorConfig([A2], [ChannelConfig("c", 100, {"A": "rw"})]),
        MonitorConfig([A2], [ChannelConfig("c", 4096, {"Z": "rw"})]),
        MonitorConfig([A2], [ChannelConfig("c", 4096, {"A": "wo"})]),
        MonitorConfig([A2], [ChannelConfig("c", 4096, {})]),
        MonitorConfig(
            [PartitionConfig("A", ram(2 * MiB))],
            [ChannelConfig("c", layout.CHANNEL_WINDOW_SIZE + 4096, {"A": "rw"})],
        ),
    ],
)
def test_bad_config_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        MonitorState.from_config(bad)


# --- dispatcher -----------------------------------------------------------------


def test_unknown_call_number_is_enosys(s0):
    for nr in (6, 1 << 32, U64_MAX, -1, "0", None):
        r = step(s0, A, nr, (0, 0, 0, 0))
        assert (r.result, r.state, r.effects) == (-ENOSYS, s0, ())


def test_bad_caller_is_esrch(s0):
    for caller in (3, -1, U64_MAX, None):
        assert step(s0, caller, 0, (0x1000, 64)).result == -ESRCH
    stopped = call(s0, A, abi.PARTITION_CONTROL, B, ControlOp.STOP).state
    assert step(stopped, B, abi.CONSOLE_WRITE, (0, 1)).result == -ESRCH


def test_arguments_must_be_u64(s0):
    for args in ((-1, 0), (1 << 64, 0), (0, 0, 0, 0, 0), (1.0, 0), None, "ab"):
        assert step(s0, A, abi.CHANNEL_ATTACH, args).result == -EINVAL
    # Missing arguments are 0: attach channel 0, flags 0.
    assert step(s0, A, abi.CHANNEL_ATTACH, ()).result == WIN


def test_rax_is_twos_complement(s0):
    assert call(s0, A, abi.CHANNEL_DETACH, 0).rax == (1 << 64) - EINVAL


# --- PARTITION_INFO ------------------------------------------------------------


def parse_info(data: bytes) -> tuple[tuple, list[tuple]]:
    head = abi.PARTITION_INFO_HEADER.unpack_from(data, 0)
    entries = [abi.PARTITION_INFO_CHANNEL.unpack_from(data, 40 + 24 * i) for i in range(head[6])]
    return head, entries


def test_partition_info_describes_the_caller(s0):
    s1 = call(s0, B, abi.CHANNEL_ATTACH, 1, 0).state
    r = call(s1, B, abi.PARTITION_INFO, 0x1000, 4096)
    assert r.result == 88 and r.state == s1
    (eff,) = r.effects
    assert isinstance(eff, WriteGuest) and (eff.partition, eff.gpa) == (B, 0x1000)
    head, entries = parse_info(eff.data)
    assert head == (1, 88, B, 2, 4 * MiB, 0, 2, (1 << B) | (1 << C))
    assert entries == [(0, 0, WIN, 0x2000), (1, 3, WIN + 0x2000, 0x1000)]
    (eff,) = call(s0, A, abi.PARTITION_INFO, 0, 64).effects
    head, entries = parse_info(eff.data)
    assert head == (1, 64, A, 1, 2 * MiB, abi.INFO_PRIVILEGED, 1, 0b11)
    assert entries == [(0, 1, WIN, 0x2000)]


@pytest.mark.parametrize(
    "caller,gpa,length,err",
    [
        (A, 4, 4096, EINVAL),  # misaligned
        (A, 2 * MiB - 8, 64, EFAULT),  # runs past the end of RAM
        (A, 2 * MiB, 64, EFAULT),
        (A, WIN, 4096, EFAULT),  # a channel is not the caller's RAM
        (A, U64_MAX - 7, 64, EFAULT),
        (A, 0, U64_MAX, EFAULT),
        (C, 3 * GiB - 8, 64, EFAULT),  # straddles the MMIO hole
        (A, 0, 63, ENOSPC),
        (A, 2 * MiB - 8, 8, ENOSPC),
    ],
)
def test_partition_info_errors(s0, caller, gpa, length, err):
    r = call(s0, caller, abi.PARTITION_INFO, gpa, length)
    assert (r.result, r.state, r.effects) == (-err, s0, ())


def test_partition_info_in_high_ram(s0):
    assert call(s0, C, abi.PARTITION_INFO, 4 * GiB + 2 * MiB - 64, 64).result == 64


# --- CONSOLE_WRITE -------------------------------------------------------------


def test_console_write(s0):
    r = call(s0, B, abi.CONSOLE_WRITE, 4 * MiB - 4096, 4096)
    assert r.result == 4096 and r.effects == (ConsoleWrite(B, 4 * MiB - 4096, 4096),)
    assert call(s0, B, abi.CONSOLE_WRITE, 0, 0) == call(s0, B, abi.CONSOLE_WRITE, 0, 0)
    assert call(s0, B, abi.CONSOLE_WRITE, 0, 0).effects == ()


def test_console_write_reads_through_the_reader(s0):
    seen = []

    def reader(partition, gpa, length):
        seen.append((partition, gpa, length))
        return b"hi!"[:length]

    r = step(s0, C, abi.CONSOLE_WRITE, (0x100, 3), reader)
    assert r.effects == (ConsoleWrite(C, 0x100, 3, b"hi!"),) and seen == [(C, 0x100, 3)]
    assert step(s0, C, abi.CONSOLE_WRITE, (0x100, 4), reader).result == -EFAULT  # short read

    def broken(partition, gpa, length):
        raise OSError("gone")

    assert step(s0, C, abi.CONSOLE_WRITE, (0x100, 3), broken).result == -EFAULT


@pytest.mark.parametrize(
    "gpa,length,err",
    [
        (0, 4097, EINVAL),
        (0, U64_MAX, EINVAL),
        (2 * MiB - 1, 2, EFAULT),
        (WIN, 1, EFAULT),
        (U64_MAX, 1, EFAULT),
    ],
)
def test_console_write_errors(s0, gpa, length, err):
    assert call(s0, A, abi.CONSOLE_WRITE, gpa, length).result == -err


# --- DOORBELL --------------------------------------------------------------------


def test_doorbell_along_grant_and_to_self(s0):
    r = call(s0, A, abi.DOORBELL, B, 1, 32)
    assert (r.result, r.effects) == (0, (RaiseInterrupt(B, 1, 32),))
    assert call(s0, C, abi.DOORBELL, C, 2, 255).effects == (RaiseInterrupt(C, 2, 255),)


@pytest.mark.parametrize(
    "caller,target,vcpu,vector,err",
    [
        (A, 3, 0, 32, ENOENT),
        (A, U64_MAX, 0, 32, ENOENT),
        (B, A, 0, 32, EPERM),  # A may ring B, not the other way
        (A, C, 0, 32, EPERM),  # not transitive
        (B, A, 99, 0, EPERM),  # the grant is checked first
        (A, B, 0, 31, EINVAL),
        (A, B, 0, 256, EINVAL),
        (A, B, 2, 32, EINVAL),
        (A, B, U64_MAX, 32, EINVAL),
    ],
)
def test_doorbell_errors(s0, caller, target, vcpu, vector, err):
    assert call(s0, caller, abi.DOORBELL, target, vcpu, vector).result == -err


def test_doorbell_to_stopped_partition_is_ebusy(s0):
    s1 = call(s0, A, abi.PARTITION_CONTROL, B, ControlOp.STOP).state
    assert call(s1, A, abi.DOORBELL, B, 0, 40).result == -EBUSY


# --- CHANNEL_ATTACH / CHANNEL_DETACH ----------------------------------------------


def test_attach_and_detach(s0):
    r = call(s0, A, abi.CHANNEL_ATTACH, 0, 0)
    assert r.result == WIN
    assert r.effects == (MapChannel(A, 0, WIN, 0x2000, True),)
    assert r.state.attachments == {Attachment(A, 0, True)}
    assert call(r.state, A, abi.CHANNEL_ATTACH, 0, 0).result == -EBUSY
    d = call(r.state, A, abi.CHANNEL_DETACH, 0)
    assert (d.result, d.effects) == (0, (UnmapChannel(A, 0, WIN, 0x2000),))
    assert d.state == s0


def test_attach_read_only(s0):
    assert call(s0, B, abi.CHANNEL_ATTACH, 0, 0).effects == (MapChannel(B, 0, WIN, 0x2000, False),)
    # An ro member asking for read-only gets read-only; an rw member may ask for it too.
    assert not call(s0, B, abi.CHANNEL_ATTACH, 0, abi.ATTACH_READONLY).effects[0].writable
    r = call(s0, C, abi.CHANNEL_ATTACH, 1, abi.ATTACH_READONLY)
    assert r.effects == (MapChannel(C, 1, WIN + 0x2000, 0x1000, False),)


@pytest.mark.parametrize(
    "caller,channel,flags,err",
    [
        (A, 2, 0, ENOENT),
        (A, U64_MAX, 0, ENOENT),
        (A, 1, 0, EPERM),
        (C, 0, 0, EPERM),
        (A, 0, 2, EINVAL),
        (A, 0, U64_MAX, EINVAL),
    ],
)
def test_attach_errors(s0, caller, channel, flags, err):
    assert call(s0, caller, abi.CHANNEL_ATTACH, channel, flags).result == -err


def test_detach_errors(s0):
    assert call(s0, A, abi.CHANNEL_DETACH, 2).result == -ENOENT
    assert call(s0, A, abi.CHANNEL_DETACH, 0).result == -EINVAL
    assert call(s0, C, abi.CHANNEL_DETACH, 0).result == -EINVAL  # not a member either
    s1 = call(s0, B, abi.CHANNEL_ATTACH, 0, 0).state
    assert call(s1, A, abi.CHANNEL_DETACH, 0).result == -EINVAL  # B's attachment is B's


# --- PARTITION_CONTROL ----------------------------------------------------------


def test_self_reboot_detaches_everything(s0):
    s1 = call(call(s0, B, abi.CHANNEL_ATTACH, 0, 0).state, B, abi.CHANNEL_ATTACH, 1, 0).state
    s1 = call(s1, C, abi.CHANNEL_ATTACH, 1, 0).state
    r = call(s1, B, abi.PARTITION_CONTROL, B, ControlOp.REBOOT)
    assert r.result == 0
    assert r.effects == (
        UnmapChannel(B, 0, WIN, 0x2000),
        UnmapChannel(B, 1, WIN + 0x2000, 0x1000),
        PartitionLifecycle(B, ControlOp.REBOOT),
    )
    assert r.state.attachments == {Attachment(C, 1, True)}
    assert r.state.lifecycle == (RUNNING,) * 3


def test_shutdown_self(s0):
    r = call(s0, C, abi.PARTITION_CONTROL, C, ControlOp.SHUTDOWN)
    assert r.state.lifecycle == (RUNNING, RUNNING, STOPPED)
    assert r.effects == (PartitionLifecycle(C, ControlOp.SHUTDOWN),)


def test_privileged_stop_start_restart(s0):
    s1 = call(s0, B, abi.CHANNEL_ATTACH, 1, 0).state
    r = call(s1, A, abi.PARTITION_CONTROL, B, ControlOp.STOP)
    assert r.state.lifecycle[B] == STOPPED and not r.state.attachments
    assert r.effects[0] == UnmapChannel(B, 1, WIN + 0x2000, 0x1000)
    assert call(r.state, A, abi.PARTITION_CONTROL, B, ControlOp.STOP).result == -EBUSY
    assert call(s1, A, abi.PARTITION_CONTROL, B, ControlOp.START).result == -EBUSY
    s2 = call(r.state, A, abi.PARTITION_CONTROL, B, ControlOp.START).state
    assert s2.lifecycle[B] == RUNNING
    s3 = call(r.state, A, abi.PARTITION_CONTROL, B, ControlOp.RESTART).state
    assert s3 == s2
    r = call(s1, A, abi.PARTITION_CONTROL, B, ControlOp.RESTART)
    assert r.state == s0 and r.effects[-1] == PartitionLifecycle(B, ControlOp.RESTART)


@pytest.mark.parametrize(
    "caller,target,op,err",
    [
        (A, 3, ControlOp.STOP, ENOENT),
        (A, U64_MAX, ControlOp.STOP, ENOENT),
        (A, B, 5, EINVAL),
        (A, B, U64_MAX, EINVAL),
        (A, A, ControlOp.STOP, EINVAL),
        (A, A, ControlOp.RESTART, EINVAL),
        (A, B, ControlOp.SHUTDOWN, EINVAL),
        (B, C, ControlOp.REBOOT, EINVAL),
        (B, C, ControlOp.STOP, EPERM),
        (C, A, ControlOp.RESTART, EPERM),
        (B, A, ControlOp.START, EPERM),  # privilege is checked before state
    ],
)
def test_control_errors(s0, caller, target, op, err):
    r = call(s0, caller, abi.PARTITION_CONTROL, target, int(op))
    assert (r.result, r.state, r.effects) == (-err, s0, ())


def test_states_are_values(s0):
    a = call(s0, A, abi.CHANNEL_ATTACH, 0, 0).state
    b = call(s0, A, abi.CHANNEL_ATTACH, 0, 0).state
    assert a == b and hash(a) == hash(b) and a != s0
    assert s0.attachments == frozenset()  # the old state is untouched


def test_dispatch_is_step_for_the_live_vmms_arguments():
    """The live VMM calls ``dispatch`` with four u64s unpacked from registers: the
    same outcome as ``step``, as a plain tuple; ``step`` alone checks arguments."""
    import itertools

    from osvmm.hypercall.monitor import StepResult, dispatch

    s = MonitorState.from_config(config())
    values = (0, 1, 64, 0x1000, WIN, U64_MAX)
    for caller, nr in itertools.product((A, B, 3), (*range(len(abi.HYPERCALLS)), 99)):
        for args in itertools.product(values, repeat=2):
            full = (*args, 0, 0)
            out = dispatch(s, caller, nr, full)
            assert type(out) is tuple and step(s, caller, nr, full) == StepResult._make(out)
    # Arguments step refuses: EINVAL, after the caller's and the call's own errors.
    assert step(s, A, abi.CONSOLE_WRITE, (1 << 64, 0)).result == -EINVAL
    assert step(s, A, abi.CONSOLE_WRITE, [0, 0, 0, 0, 0]).result == -EINVAL
    assert step(s, A, 99, (-1,)).result == -ENOSYS
    assert step(s, 7, abi.CONSOLE_WRITE, (-1,)).result == -ESRCH
    assert isinstance(step(s, A, abi.CONSOLE_WRITE, (0, 0)), StepResult)
