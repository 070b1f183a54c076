"""The hypercall ABI: the one table of the six calls, and the constants they use.

docs/hypercalls.md is the specification; this module is its machine-readable
half. The dispatcher (``monitor.step``), the documentation test and the model
checker all read ``HYPERCALLS``: a call's number, name, argument names, the
set of errors it may return, and the name of its handler in ``monitor``.

Calling convention (x86-64, port I/O so CPL3 code with IOPL=3, or a Linux
process after ioperm(), can call the VMM):

    out dx, eax     DX = HYPERCALL_PORT, EAX = call number
    a0..a3          RDI, RSI, RBX, RCX (unsigned 64-bit)
    result          RAX: >= 0 success, negative errno on failure
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HYPERCALL_PORT = 0x0510
ABI_VERSION = 1

NUMBER_REGISTER = "eax"  # the low 32 bits of RAX: what `out dx, eax` writes
ARG_REGISTERS = ("rdi", "rsi", "rbx", "rcx")
RESULT_REGISTER = "rax"
NUM_ARGS = len(ARG_REGISTERS)
U64_MAX = (1 << 64) - 1

# Linux errno values (the ABI fixes them; they do not follow the host's errno).
EPERM = 1
ENOENT = 2
ESRCH = 3
EFAULT = 14
EBUSY = 16
EINVAL = 22
ENOSPC = 28
ENOSYS = 38

ERROR_NAMES = {
    EPERM: "EPERM",
    ENOENT: "ENOENT",
    ESRCH: "ESRCH",
    EFAULT: "EFAULT",
    EBUSY: "EBUSY",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    ENOSYS: "ENOSYS",
}

# Errors the dispatcher returns before any handler runs.
#   ENOSYS: the call number is not one of HYPERCALLS.
#   ESRCH:  the caller is not a running partition (the VMM never dispatches such
#           a call; a guest cannot observe it).
DISPATCH_ERRORS = frozenset({ENOSYS, ESRCH})


class ControlOp(enum.IntEnum):
    """The ``op`` argument of PARTITION_CONTROL."""

    SHUTDOWN = 0  # on itself: power off
    REBOOT = 1  # on itself: reset and boot again
    STOP = 2  # on another partition (privileged caller): power off
    START = 3  # on another, stopped partition (privileged caller): boot
    RESTART = 4  # on another partition (privileged caller): power off and boot


SELF_OPS = frozenset({ControlOp.SHUTDOWN, ControlOp.REBOOT})
OTHER_OPS = frozenset({ControlOp.STOP, ControlOp.START, ControlOp.RESTART})
# Ops after which the target partition is running again (a fresh boot).
BOOT_OPS = frozenset({ControlOp.REBOOT, ControlOp.START, ControlOp.RESTART})

# CHANNEL_ATTACH flags.
ATTACH_READONLY = 1 << 0  # map read-only even where the plan grants "rw"
ATTACH_FLAGS = ATTACH_READONLY

# DOORBELL vectors: 0..31 are the CPU's exceptions.
VECTOR_MIN = 32
VECTOR_MAX = 255

CONSOLE_WRITE_MAX = 4096

# PARTITION_INFO: a header, then one entry per channel the caller is a member of.
PARTITION_INFO_ALIGN = 8
# abi_version, length, partition_id, vcpu_count, memory_size, flags,
# channel_count, doorbell_mask
PARTITION_INFO_HEADER = struct.Struct("<IIIIQIIQ")
assert PARTITION_INFO_HEADER.size == 40
# channel_id, flags, gpa, size
PARTITION_INFO_CHANNEL = struct.Struct("<IIQQ")
assert PARTITION_INFO_CHANNEL.size == 24
INFO_PRIVILEGED = 1 << 0  # header flags
INFO_CHANNEL_WRITABLE = 1 << 0  # channel flags: the plan grants "rw"
INFO_CHANNEL_ATTACHED = 1 << 1  # channel flags: attached now

# Bounds on a plan (doorbell_mask has 64 bits; 64 channel entries fit in 4 KiB).
MAX_PARTITIONS = 64
MAX_CHANNELS = 64


@dataclass(frozen=True)
class Hypercall:
    """One row of the ABI table."""

    nr: int
    name: str
    args: tuple[str, ...]
    errors: frozenset[int]
    handler: str

    @property
    def error_names(self) -> frozenset[str]:
        return frozenset(ERROR_NAMES[e] for e in self.errors)

    def signature(self) -> str:
        return f"{self.name}({', '.join(self.args)})"


HYPERCALLS: tuple[Hypercall, ...] = (
    Hypercall(
        0,
        "PARTITION_INFO",
        ("buf_gpa", "buf_len"),
        frozenset({EINVAL, EFAULT, ENOSPC}),
        "partition_info",
    ),
    Hypercall(1, "CONSOLE_WRITE", ("gpa", "len"), frozenset({EINVAL, EFAULT}), "console_write"),
    Hypercall(
        2,
        "DOORBELL",
        ("target_partition_id", "vcpu_index", "vector"),
        frozenset({ENOENT, EPERM, EINVAL, EBUSY}),
        "doorbell",
    ),
    Hypercall(
        3,
        "CHANNEL_ATTACH",
        ("channel_id", "flags"),
        frozenset({ENOENT, EPERM, EINVAL, EBUSY}),
        "channel_attach",
    ),
    Hypercall(4, "CHANNEL_DETACH", ("channel_id",), frozenset({ENOENT, EINVAL}), "channel_detach"),
    Hypercall(
        5,
        "PARTITION_CONTROL",
        ("target_partition_id", "op"),
        frozenset({ENOENT, EINVAL, EPERM, EBUSY}),
        "partition_control",
    ),
)

BY_NUMBER: dict[int, Hypercall] = {c.nr: c for c in HYPERCALLS}
BY_NAME: dict[str, Hypercall] = {c.name: c for c in HYPERCALLS}

PARTITION_INFO = 0
CONSOLE_WRITE = 1
DOORBELL = 2
CHANNEL_ATTACH = 3
CHANNEL_DETACH = 4
PARTITION_CONTROL = 5
for _call in HYPERCALLS:
    assert globals()[_call.name] == _call.nr, _call.name


def encode_result(result: int) -> int:
    """The RAX value for a result (a negative errno becomes its two's complement)."""
    return result & U64_MAX


def decode_result(rax: int) -> int:
    """The signed result a guest sees in RAX."""
    rax &= U64_MAX
    return rax - (1 << 64) if rax >> 63 else rax


def result_name(result: int) -> str:
    """``0xd0000000`` for a success, ``-EINVAL`` for an error."""
    if result >= 0:
        return f"{result:#x}" if result > 9 else str(result)
    return "-" + ERROR_NAMES.get(-result, str(-result))


def info_size(channel_count: int) -> int:
    """Bytes PARTITION_INFO writes for a partition that is a member of ``channel_count``."""
    return PARTITION_INFO_HEADER.size + channel_count * PARTITION_INFO_CHANNEL.size
