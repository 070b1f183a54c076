"""The error tree of osvmm: one root, one class per kind of failure.

Every error a user can cause (bad config, bad image, missing /dev/kvm) or a
guest can cause (triple fault, emulation failure) is an OsvmmError. The CLI
prints ``str(err)`` as one line and exits with ``err.exit_status``; nothing
below the CLI prints tracebacks for these.

Exit statuses of ``osvmm`` (docs/exit-status.md has the table):
  0            the guest powered off / all partitions ended normally
  odd 1..255   the guest wrote V to the isa-debug-exit port: (V << 1) | 1 (as QEMU)
  2            bad input: usage, config, image, memory size, /dev/kvm unusable
  4            a guest fault: triple fault, emulation failure, failed VM entry
  6            an internal VMM error (a KVM call failed unexpectedly)
  130          interrupted: Ctrl-C, Ctrl-A x, SIGTERM, SIGHUP or SIGQUIT ending ``osvmm run``
  (SIGPIPE)    ``osvmm run`` whose stdout's reader went away ends as SIGPIPE ends a program
"""

from __future__ import annotations

import errno as _errno
import os

EXIT_USAGE = 2
EXIT_GUEST_FAULT = 4
EXIT_INTERNAL = 6
EXIT_INTERRUPTED = 130
EXIT_SIGPIPE = 128 + 13  # not returned: the CLI re-raises SIGPIPE (osvmm/cli.py main)


class OsvmmError(Exception):
    """Root of every osvmm error; its message is one line for the user."""

    exit_status = EXIT_USAGE


class ConfigError(OsvmmError):
    """A bad command-line value or partition plan."""


class ImageError(OsvmmError):
    """A guest image (kernel, initrd, ELF) that is missing, corrupt or unsupported."""


class GuestMemoryError(OsvmmError):
    """A guest-physical address or range outside guest memory, or overlapping regions."""


class BuildError(OsvmmError):
    """The bundled guests could not be built (no compiler, compile error)."""


class KvmUnavailable(OsvmmError):
    """/dev/kvm is missing or not permitted."""


class KvmError(OsvmmError):
    """A KVM ioctl failed; carries errno and the request's name."""

    exit_status = EXIT_INTERNAL

    def __init__(self, err: int, request: str, detail: str = ""):
        self.errno = err
        self.request = request
        name = _errno.errorcode.get(err, str(err))
        msg = f"{request} failed: {name} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class EnforceError(OsvmmError):
    """The host refused what the plan asks for (pinning, memory policy, locking)."""


class ControlError(OsvmmError):
    """The control socket of ``osvmm up`` cannot be reached or answered an error."""


class NoSuchPartition(ConfigError):
    """A request names a partition the VMM does not have (the API's 404)."""


class WrongState(ConfigError):
    """A request that the partition's state forbids now: start a running partition,
    stop a stopped one, snapshot one not running (the API's 409)."""


class SnapshotError(OsvmmError):
    """A snapshot that cannot be read or restored here (truncated, corrupt, another
    version, another machine, an incompatible host), or a migration that failed."""


class VmmBug(OsvmmError):
    """An unexpected exception inside the VMM (a bug, not the user's or the guest's
    doing): reported in one line, the traceback kept in the partition's log."""

    exit_status = EXIT_INTERNAL

    def __init__(self, message: str, traceback_text: str = ""):
        self.traceback_text = traceback_text
        super().__init__(message)

    @classmethod
    def from_exception(cls, where: str, err: BaseException) -> VmmBug:
        import traceback

        text = "".join(traceback.format_exception(err))
        return cls(f"internal error in the VMM ({where}): {type(err).__name__}: {err}", text)


class GuestFault(OsvmmError):
    """The guest stopped in a way it cannot recover from (triple fault, ...)."""

    exit_status = EXIT_GUEST_FAULT

    def __init__(self, vcpu: int, rip: int, reason: str):
        self.vcpu = vcpu
        self.rip = rip
        self.reason = reason
        super().__init__(f"guest fault on vcpu {vcpu} at rip {rip:#x}: {reason}")
