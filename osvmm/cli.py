"""The ``osvmm`` command.

Every failure a user can cause ends in one line on stderr and the status of
docs/exit-status.md; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys

from osvmm import __version__
from osvmm.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_SIGPIPE, ConfigError, OsvmmError
from osvmm.stdio import ensure_std_fds, say, settle

# -- osvmm run -------------------------------------------------------------------


def add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="boot one guest image or Linux kernel in one partition",
        description="Boot a PVH or ELF64 image, or a Linux kernel, in one partition. "
        "The console is COM1 on stdio; a write of V to port 0xf4 ends the run "
        "with status (V << 1) | 1, as QEMU's isa-debug-exit.",
    )
    p.add_argument("image", nargs="?", help="ELF image (PVH or ELF64), or guests:NAME")
    p.add_argument("--kernel", "-kernel", help="Linux kernel: bzImage or vmlinux")
    p.add_argument("--initrd", "-initrd", help="initial ramdisk for --kernel")
    p.add_argument("--append", "-append", default="", help="kernel command line")
    p.add_argument("--memory", "-m", help="guest memory, K/M/G suffix (64M)")
    p.add_argument("--cpus", "-smp", help="number of vCPUs (1)")
    p.add_argument("--numa", type=int, help="NUMA nodes to split the guest into (1)")
    p.add_argument(
        "--drive",
        action="append",
        metavar="FILE[,ro]",
        help="a raw disk image as a virtio-blk disk (repeatable: /dev/vda, /dev/vdb, ...); "
        ",ro makes it read-only (docs/devices.md)",
    )
    p.add_argument(
        "--net",
        action="append",
        metavar="tap=NAME[,mac=...]",
        help="a NIC on host tap device NAME, as virtio-net (repeatable; docs/devices.md)",
    )
    p.add_argument(
        "--vsock",
        action="append",
        metavar="uds=PATH[,cid=N]",
        help="a virtio-vsock device (one), its guest CID N (3); host programs reach the "
        "guest through the Unix socket PATH (write 'CONNECT PORT\\n', read 'OK ...'), "
        "guest connects to the host (CID 2) port P reach PATH_P (docs/devices.md)",
    )
    p.add_argument("--stats", action="store_true", help="print exit statistics at the end")
    p.add_argument(
        "--serial-input",
        action="store_true",
        help="forward stdin to the guest even when it is not a terminal",
    )
    snap = p.add_argument_group("snapshots (docs/snapshots.md)")
    snap.add_argument(
        "--restore",
        metavar="DIR",
        help="resume the snapshot in DIR instead of booting (its memory is mapped from "
        "the snapshot, copy-on-write); no IMAGE, --memory, --cpus or --numa; its disks "
        "taps and vsock socket are reopened, or --drive gives images of the same size, "
        "--net taps and --vsock a socket in their place",
    )
    snap.add_argument(
        "--snapshot",
        metavar="DIR",
        help="on SIGUSR2, pause the guest, write a snapshot into DIR and go on",
    )
    snap.add_argument(
        "--snapshot-stop", action="store_true", help="stop after that snapshot (status 0)"
    )
    p.set_defaults(func=cmd_run)


def _parse_count(text: str, option: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a whole number") from None
    if n < 1:
        raise ConfigError(f"{option}: {n} must be at least 1")
    return n


def _run_machine(args, disks: int = 0):
    """The Machine of ``osvmm run``: from --memory, --cpus and --numa, with ``disks``
    virtio-mmio devices (--drive)."""
    from osvmm.machine import MAX_VCPUS, Machine
    from osvmm.plan.sizes import parse_size

    memory = "64M" if args.memory is None else args.memory
    cpus_text = "1" if args.cpus is None else args.cpus
    numa = 1 if args.numa is None else args.numa
    cpus = _parse_count(cpus_text, "--cpus")
    if cpus > MAX_VCPUS:
        raise ConfigError(f"--cpus {cpus}: a partition has at most {MAX_VCPUS} vCPUs")
    try:
        return Machine.build(parse_size(memory, "--memory"), cpus, numa, virtio_mmio=disks)
    except ConfigError as err:
        raise ConfigError(f"--memory {memory} --cpus {cpus} --numa {numa}: {err}") from None


def _restore_source(args):
    """The snapshot ``--restore`` names, read and checked whole; one of a partition
    that was on a plan's network is refused (``osvmm run`` has no networks: its
    NIC would be on a switch with no one else, a cable to nowhere)."""
    from osvmm.vmm.snapshot import Snapshot, snapshot_networks

    given = [
        opt
        for opt, value in (
            ("IMAGE", args.image),
            ("--kernel", args.kernel),
            ("--initrd", args.initrd),
            ("--append", args.append),
            ("--memory", args.memory),
            ("--cpus", args.cpus),
            ("--numa", args.numa),
        )
        if value is not None and value != ""
    ]
    if given:
        raise ConfigError(
            f"--restore resumes the snapshot's guest and machine: leave out {', '.join(given)}"
        )
    snap = Snapshot.read(args.restore)
    networks = [name for name, _ in snapshot_networks(snap.state)]
    if networks:
        snap.close()
        raise ConfigError(
            f"--restore {args.restore}: partition {snap.state.get('name')!r} was on "
            f"network{'s' if len(networks) > 1 else ''} {', '.join(networks)} of a plan, "
            "which osvmm run does not have: resume it under osvmm up, from a plan with "
            f'that network (restore = "{args.restore}")'
        )
    return snap


def cmd_run(args) -> int:
    from osvmm.guests import resolve_image
    from osvmm.up.locks import free_cpus
    from osvmm.vmm.console import StdinForwarder, fd_writer
    from osvmm.vmm.exit_stats import format_exit_stats
    from osvmm.vmm.partition import Partition, PartitionConfig

    if args.snapshot_stop and not args.snapshot:
        raise ConfigError("--snapshot-stop: only with --snapshot DIR")
    # First thing: a SIGUSR2 while the partition is still being built must not end us.
    snapshot_wanted = _snapshot_signal() if args.snapshot else None
    snap = None
    if args.restore:
        snap = _restore_source(args)
        machine = snap.machine
    else:
        if args.image and args.kernel:
            raise ConfigError("give either IMAGE or --kernel, not both")
        if not args.image and not args.kernel:
            raise ConfigError("nothing to boot: give an IMAGE (or guests:NAME) or --kernel")
        machine = None
    drives = nets = ()
    vsock = None
    if args.drive or args.net or args.vsock:
        from osvmm.plan.drives import MAX_DEVICES, parse_drive, parse_net, parse_vsock

        drives = tuple(parse_drive(text) for text in args.drive or ())
        nets = tuple(parse_net(text) for text in args.net or ())
        if args.vsock and len(args.vsock) > 1:
            raise ConfigError(f"--vsock: given {len(args.vsock)} times, a partition has one")
        vsock = parse_vsock(args.vsock[0]) if args.vsock else None
        if len(drives) + len(nets) + (vsock is not None) > MAX_DEVICES:
            raise ConfigError(
                f"--drive, --net, --vsock: {len(drives)} disks, {len(nets)} NICs and "
                f"{int(vsock is not None)} vsock, a partition has at most {MAX_DEVICES} devices"
            )
    if machine is None:
        machine = _run_machine(args, len(drives) + len(nets) + (vsock is not None))
    else:  # a restore reopens the snapshot's disks and taps, unless told others
        from dataclasses import replace

        from osvmm.vmm.snapshot import snapshot_drives, snapshot_nets, snapshot_vsock

        drives = drives or snapshot_drives(snap.state)
        had = snapshot_nets(snap.state)
        if nets and len(nets) == len(had):  # another tap keeps the snapshot's MAC
            nets = tuple(
                n if n.mac else replace(n, mac=h.mac) for n, h in zip(nets, had, strict=True)
            )
        nets = nets or had
        vsock = vsock or snapshot_vsock(snap.state)

    def stdout_closed() -> None:  # on a vCPU thread: the run ends, then the process
        part.stop(0, STDOUT_GONE)

    config = PartitionConfig(
        machine=machine,
        image=resolve_image(args.image) if args.image else None,
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.append or "",
        console=fd_writer(sys.stdout.fileno(), on_closed=stdout_closed),
        restore=snap,
        drives=drives,
        nets=nets,
        vsock=vsock,
    )
    if snap is not None:
        config.name = snap.state.get("name") or config.name
        boot = snap.state.get("boot") or {}
        config.image, config.kernel = boot.get("image"), boot.get("kernel")
        config.cmdline = boot.get("cmdline") or ""
    # Off the CPUs other VMMs dedicate to their partitions (osvmm/up/locks.py).
    allowed = os.sched_getaffinity(0)
    free = set(free_cpus(sorted(allowed), "osvmm run"))
    if free != allowed:
        os.sched_setaffinity(0, free)
    part = Partition(config)

    def interrupt(reason: str) -> None:
        part.stop(EXIT_INTERRUPTED, reason)

    forwarder = None
    try:
        part.build()
        if snap is not None:
            snap.close()
        for line in part.boot_log:
            say(f"osvmm: {line}")
        with _ending_signals(lambda signum: interrupt(_signal_name(signum))):
            part.start()
            if args.serial_input or os.isatty(sys.stdin.fileno()):
                # Ctrl-A x ends the run as Ctrl-C does: status 130 (docs/exit-status.md)
                forwarder = StdinForwarder(part.serial, on_quit=lambda: interrupt("quit"))
                forwarder.start()
            try:
                result = None
                while result is None:
                    result = part.wait(0.05 if snapshot_wanted else None)
                    if snapshot_wanted is not None and snapshot_wanted.is_set():
                        snapshot_wanted.clear()
                        _snapshot_now(part, args.snapshot, args.snapshot_stop)
            except KeyboardInterrupt:
                interrupt("interrupted")
                result = part.wait()
        if forwarder:
            forwarder.stop()
        if result.reason == STDOUT_GONE:
            return EXIT_SIGPIPE
        if result.fault is not None:
            say(f"osvmm: {result.fault}")
            if getattr(result.fault, "traceback_text", "") and os.environ.get("OSVMM_DEBUG"):
                say(result.fault.traceback_text.rstrip("\n"))
        if args.stats:
            stats = format_exit_stats(part.exit_stats(), part.pio.unclaimed, part.mmio.unclaimed)
            say(stats.rstrip("\n"))
        return result.status
    finally:
        if forwarder:
            forwarder.stop()
        if not getattr(args, "process_ends", False):
            part.close()  # else the kernel reclaims the VM and its memory as the process ends
        else:
            part.remove_host_files()  # but not a socket file (--vsock)
        if snap is not None:
            snap.close()


STDOUT_GONE = "the reader of stdout is gone (EPIPE)"
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _snapshot_signal():
    """An Event set by each SIGUSR2 (``--snapshot``)."""
    import signal
    import threading

    wanted = threading.Event()
    signal.signal(signal.SIGUSR2, lambda signum, frame: wanted.set())
    return wanted


def _snapshot_now(part, directory: str, stop: bool) -> None:
    """``--snapshot``: write one, print one line; a failure is printed and the guest
    goes on."""
    then = (lambda: part.stop(0, f"stopped after a snapshot to {directory}")) if stop else None
    try:
        written, paused_ms = part.snapshot(directory, then=then)
    except OsvmmError as err:
        say(f"osvmm: snapshot failed: {err}")
        return
    say(f"osvmm: {describe_snapshot(written, paused_ms)}")


def describe_snapshot(written, paused_ms: float) -> str:
    return (
        f"snapshot in {written.directory}: {written.bytes_stored >> 10} KiB of "
        f"{written.memory_size >> 20} MiB memory stored, paused {paused_ms:.1f} ms"
    )


def _signal_name(signum: int) -> str:
    return f"ended by {signal.Signals(signum).name}"


@contextlib.contextmanager
def _ending_signals(handler):
    """SIGTERM, SIGHUP and SIGQUIT call ``handler(signum)`` (the run ends and is
    cleaned up, the terminal restored) instead of killing the process."""
    saved = {s: signal.signal(s, lambda signum, frame: handler(signum)) for s in ENDING_SIGNALS}
    try:
        yield
    finally:
        for s, old in saved.items():
            signal.signal(s, old)


# -- osvmm caps ------------------------------------------------------------------


def add_caps_parser(sub) -> None:
    p = sub.add_parser("caps", help="print this host's KVM capabilities that osvmm uses")
    p.set_defaults(func=cmd_caps)


def cmd_caps(args) -> int:
    from osvmm.kvm.caps import format_caps

    print(format_caps(), end="")
    return 0


# -- osvmm guests ------------------------------------------------------------------


def add_guests_parser(sub) -> None:
    p = sub.add_parser("guests", help="build the bundled guests and print their paths")
    p.add_argument("names", nargs="*", help="guests to build (default: all)")
    p.set_defaults(func=cmd_guests)


def cmd_guests(args) -> int:
    from osvmm.guests import BUNDLED_PREFIX, resolve_image
    from osvmm.guests.build import GUEST_NAMES

    for name in args.names or GUEST_NAMES:
        print(f"{name}\t{resolve_image(BUNDLED_PREFIX + name)}")
    return 0


# -- main ---------------------------------------------------------------------------


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` gives it: $COLUMNS, else
    stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", 0))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, its width from ``_columns``: argparse makes one for each
    argument it adds (to check its metavar), and without a width each imports
    ``shutil`` (with zlib, bz2, lzma and fnmatch), 5 ms of a run's start
    (docs/performance.md, "Cold start")."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position, width or _columns() - 2)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # usage errors: one line, status 2
        raise ConfigError(f"{self.prog}: {message}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv`` naming a subcommand, only that subcommand's module is
    imported (start-up time is part of every command's cost)."""
    parser = _Parser(prog="osvmm", description="A lightweight partitioning VMM on KVM.")
    parser.add_argument("--version", action="version", version=f"osvmm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    chosen = next((a for a in argv or () if not a.startswith("-")), None)
    own = {"run": add_run_parser, "caps": add_caps_parser, "guests": add_guests_parser}
    if chosen in own:  # each parser costs about a millisecond to make
        own[chosen](sub)
        return parser
    for add in own.values():
        add(sub)
    wanted = [e for e in EXTRA_COMMANDS if chosen in e[2]] or EXTRA_COMMANDS
    for module, func, _names in wanted:
        getattr(importlib.import_module(module), func)(sub)
    return parser


# Subcommands defined next to what they drive: (module, function adding the
# parsers, the subcommand names it adds).
EXTRA_COMMANDS = [
    ("osvmm.plan.command", "add_plan_parser", ("plan",)),
    ("osvmm.hypercall.command", "add_verify_parser", ("verify",)),
    ("osvmm.boot.initramfs", "add_initramfs_parser", ("initramfs",)),
    (
        "osvmm.up.commands",
        "add_up_parsers",
        (
            *("up", "ps", "start", "stop", "restart", "console", "stat", "down"),
            *("snapshot", "migrate", "protect", "violations", "top", "metrics"),
            *("create", "destroy"),
        ),
    ),
]


def main(argv: list[str] | None = None, process_ends: bool = False) -> int:
    """The command; its status never depends on whether a message could be written
    (osvmm/stdio.py), and a reader of stdout that went away ends it as SIGPIPE would.
    ``process_ends``: the process ends right after (``entry``), so what the command
    holds need not be torn down first."""
    ensure_std_fds()
    status = _main(argv, process_ends)
    settle()
    if status == EXIT_SIGPIPE:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
    return status


def _main(argv: list[str] | None, process_ends: bool = False) -> int:
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = build_parser(argv).parse_args(argv)
        args.process_ends = process_ends
        return args.func(args)
    except OsvmmError as err:
        say(f"osvmm: error: {err}")
        return err.exit_status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as err:  # noqa: BLE001 - a VMM bug: one line, and how to see more
        if os.environ.get("OSVMM_DEBUG"):
            raise
        say(
            f"osvmm: internal error: {type(err).__name__}: {err} "
            "(set OSVMM_DEBUG=1 for a traceback)"
        )
        return EXIT_INTERNAL


def entry() -> None:
    """The ``osvmm`` command (the console script, ``python3 -m osvmm.cli``): ``main``,
    then the process ends at once: the interpreter's finalization and the teardown
    of a VM the kernel reclaims anyway are not waited for (start-up and end are part
    of every command's cost)."""
    os._exit(main(process_ends=True))  # main has flushed stdout and stderr (settle)


if __name__ == "__main__":
    entry()
