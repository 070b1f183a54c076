"""Starting the VMM of ``osvmm up``: check the plan, then serve in the foreground
or detached.

``up(plan_file, log_dir, detach, quiet)`` checks the plan against this host
(placement, every image loads, every boot prepares) before anything starts,
then ``serve``s: it claims the control socket (its lock file: a second VMM on
it is refused) and the dedicated CPUs (osvmm/up/locks.py: a CPU another VMM
dedicates is refused, and kept out of the pool), then runs the supervisor, the
hypercall interface and the control server until ``down``, SIGTERM, SIGHUP,
SIGQUIT (status 0) or Ctrl-C (status 130), each of which stops every partition
first; detached or under a service manager SIGHUP re-reads the plan instead
(``reread``). ``--detach`` forks first; the parent returns once the child
reports ``ready`` (or its one-line error) on a pipe. A service manager is told
when it is ready, reloading and stopping (osvmm/up/notify.py). ``--listen``
with ``--token-file`` serves the control API on TCP too (docs/api.md).

Consoles go to stdout and events to stderr through Spools (osvmm/up/consoles.py):
a stdout nobody reads, a closed or full stderr, lose output (counted in ``ps``)
and never stop a partition or the VMM.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable

from osvmm.errors import EXIT_INTERRUPTED, ControlError, OsvmmError
from osvmm.stdio import say

ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def default_log_dir(plan_source: str) -> str:
    """$XDG_STATE_HOME/osvmm/<plan name> (default ~/.local/state/osvmm/<plan name>)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    stem = os.path.splitext(os.path.basename(plan_source))[0] or "plan"
    return os.path.join(state, "osvmm", stem)


def up(
    plan_file: str,
    log_dir: str | None,
    detach: bool,
    quiet: bool,
    incoming: str | None = None,
    takeover: bool = False,
    group: str | None = None,
    listen: str | None = None,
    token_file: str | None = None,
) -> int:
    from osvmm.plan.config import load_plan
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology
    from osvmm.up.partition_config import check_boot
    from osvmm.up.protocol import is_listening
    from osvmm.up.writemon import check_protection

    tcp = None
    if listen is not None or token_file is not None:
        if listen is None or token_file is None:
            raise ControlError("--listen and --token-file go together: a TCP API needs a token")
        from osvmm.up.protocol import parse_host_port, read_token

        tcp = (parse_host_port(listen, "--listen"), read_token(token_file))
    plan = load_plan(plan_file)
    assignment = place(plan, read_topology("/sys"))
    for warning in assignment.warnings:
        say(f"osvmm: warning: {warning}")
    # Every image loads and every boot prepares, before anything starts (an arriving
    # partition's images and socket may be its VMM's until it hands them over).
    check_boot(assignment, held_elsewhere=incoming is not None or takeover)
    check_protection(assignment)  # every write-monitor range, symbol and grant resolves
    path = plan.vmm.control_socket
    if takeover and incoming is not None:
        raise ControlError("--takeover and --incoming: one or the other")
    if takeover and not is_listening(path):
        raise ControlError(f"--takeover: no VMM is listening on {path}")
    log_dir = log_dir or plan.vmm.log_dir or default_log_dir(plan.source)
    if incoming is not None:
        from osvmm.snapshot.stream import parse_address

        parse_address(incoming)
    if detach:
        return detached(
            lambda ready: serve(
                assignment, path, log_dir, True, ready, incoming, takeover, group, tcp
            )
        )
    return serve(assignment, path, log_dir, quiet, None, incoming, takeover, group, tcp)


def detached(serve_: Callable[[Callable[[str], None]], int]) -> int:
    """Fork; the child serves, the parent waits for 'ready' (or the error) on a pipe."""
    rfd, wfd = os.pipe()  # above 2: osvmm/stdio.py opened any closed standard fd
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        status = 2

        told = []

        def ready(msg: str) -> None:  # the parent may be gone (Ctrl-C): the VMM goes on
            if told:
                return  # one line only; the pipe is closed (and its number reused)
            told.append(msg)
            try:
                os.write(wfd, msg.encode() + b"\n")
            except OSError:
                pass
            os.close(wfd)

        try:
            status = serve_(ready)
        except OsvmmError as err:
            ready(f"error: {err}")
            status = err.exit_status
        except BaseException:  # noqa: BLE001 - the child must end here, never return
            ready("error: the VMM failed while starting")
            status = 6
        finally:
            os._exit(status)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        line = r.readline().decode().strip()
    if line.startswith("ready"):
        say(f"osvmm: {line[len('ready:') :].strip()} (pid {pid})")
        return 0
    os.waitpid(pid, 0)
    raise ControlError(line[len("error: ") :] if line.startswith("error: ") else "the VMM died")


def serve(
    assignment,
    path: str,
    log_dir: str,
    quiet: bool,
    ready,
    incoming=None,
    takeover=False,
    group: str | None = None,
    tcp: tuple | None = None,
) -> int:
    """Run every partition and the control socket until ``down``, SIGTERM, SIGHUP,
    SIGQUIT (0) or Ctrl-C (130). ``incoming``: start none, accept migrations of them
    at that address instead. ``takeover``: take every running partition of the VMM
    serving ``path`` (memory handed over, not copied), then claim its control socket
    and its CPUs once it has gone."""
    from osvmm.up.consoles import ECHO_SPOOL, LineEcho, Spool, fd_sink
    from osvmm.up.hypercalls import serve_supervisor
    from osvmm.up.locks import free_cpus, reserve_cpus
    from osvmm.up.migrate import IncomingServer, take_over
    from osvmm.up.notify import notify
    from osvmm.up.server import ControlServer
    from osvmm.up.supervisor import Supervisor

    down = threading.Event()
    reload = threading.Event()
    # SIGHUP: in the foreground the terminal hung up, and the VMM ends; detached or
    # under a service manager nothing hangs up, and it re-reads what it can (reread).
    hup_reloads = ready is not None or bool(os.environ.get("NOTIFY_SOCKET"))
    for signum in ENDING_SIGNALS:  # from now on they end the VMM in order, as down does
        if signum == signal.SIGHUP and hup_reloads:
            signal.signal(signum, lambda signum, frame: reload.set())
        else:
            signal.signal(signum, lambda signum, frame: down.set())
    listen, token = tcp if tcp is not None else (None, None)
    server = ControlServer(path, None, on_down=down.set, group=group, listen=listen, token=token)
    if not takeover:  # a takeover claims the socket once the old VMM has gone
        server.open()  # first: a second VMM on this socket stops here, before any log is opened
    cleanup: list[Callable[[], None]] = [server.close]
    reservations = []  # the dedicated CPUs held (osvmm/up/locks.py)
    status = 0
    try:
        dedicated = [c for p in assignment.partitions for c in p.cpus]
        if not takeover:
            reservations.append(reserve_cpus(dedicated))
            cleanup.insert(0, reservations[-1].release)
        if any(not p.cpus for p in assignment.partitions):  # floating partitions share the pool
            pool = free_cpus(assignment.pool, "the pool")
            assignment = dataclasses.replace(assignment, pool=pool)
        # The VMM's own threads (control, supervision, builds) stay off dedicated cores:
        # they run on the pool; each vCPU thread pins itself when it starts.
        if assignment.pool and dedicated:
            os.sched_setaffinity(0, set(assignment.pool))
        streams = {"stderr": Spool("stderr", fd_sink(2), ECHO_SPOOL)}
        if not quiet:
            streams["stdout"] = Spool("stdout", fd_sink(1), ECHO_SPOOL)
        for spool in streams.values():
            cleanup.insert(0, spool.close)
        sup = Supervisor(
            assignment,
            log_dir=log_dir,
            echo=LineEcho(streams["stdout"]) if "stdout" in streams else None,
            event_log=lambda text: streams["stderr"].put(f"osvmm: {text}\n".encode()),
            log_max=assignment.plan.vmm.console_log_max,
        )
        cleanup.insert(0, sup.close)
        sup.streams = streams
        sup.reservations = reservations  # a plan partition destroyed gives its CPUs back
        streams["stderr"].report = sup.log_file_only  # stderr's own failures: the log only
        if "stdout" in streams:
            streams["stdout"].report = sup.log
        threading.excepthook = _log_thread_bug(sup)
        cleanup.append(lambda: setattr(threading, "excepthook", threading.__excepthook__))
        hypercalls = serve_supervisor(sup)  # the six hypercalls, channels and doorbells
        cleanup.insert(1, hypercalls.close)
        release = api_services(server, sup, hypercalls, down.set)
        cleanup.insert(cleanup.index(sup.close) + 1, release)  # once the partitions stopped
        server.sup = sup
        if takeover:
            reply = take_over(path, sup)
            sup.log(
                f"up: took over {len(reply['partitions'])} partitions from pid {reply['pid']} "
                f"(paused {reply['downtime_ms']:.1f} ms, {reply['bytes_copied']} bytes copied)"
            )
            server.open()
            reservations.append(reserve_cpus(dedicated))
            cleanup.insert(0, reservations[-1].release)
        receiver = None
        if incoming is not None:
            receiver = IncomingServer(incoming, sup, sup.kvm)
            cleanup.insert(0, receiver.close)
        server.start()
        sup.log(f"up: {len(sup.partitions)} partitions, control socket {path}, logs in {log_dir}")
        if server.tcp_address is not None:
            host, port = server.tcp_address
            sup.log(f"up: the control API on TCP at {host}:{port} (with the token)")
        if receiver is not None:
            receiver.start()
            sup.log(f"up: waiting for incoming migrations at {incoming}")
        elif not takeover:
            sup.start_all()
        if ready is not None:
            ready(f"ready: {len(sup.partitions)} partitions up, control socket {path}")
        notify(  # a service manager's readiness (osvmm/up/notify.py)
            "READY=1",
            f"MAINPID={os.getpid()}",
            f"STATUS={len(sup.partitions)} partitions, control socket {path}",
        )
        try:
            while not down.wait(0.5):
                if reload.is_set():
                    reload.clear()
                    reread(sup, path)
            why = "down"
        except KeyboardInterrupt:
            why, status = "interrupted (Ctrl-C)", EXIT_INTERRUPTED
        sup.log(f"{why}: stopping every partition")
        notify("STOPPING=1", f"STATUS={why}: stopping every partition")
    finally:
        for step in cleanup:
            try:
                step()
            except Exception as err:  # noqa: BLE001 - every step is tried
                say(f"osvmm: internal error while stopping: {type(err).__name__}: {err}")
    return status


def reread(sup, path: str) -> None:
    """SIGHUP's reload: the plan file read again and what can change applied
    (Supervisor.reload); a plan that no longer reads changes nothing. The service
    manager is told (RELOADING=1, then READY=1)."""
    import time

    from osvmm.plan.config import load_plan
    from osvmm.up.notify import notify

    usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
    notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the plan")
    try:
        notes = sup.reload(load_plan(sup.plan.source))
    except OsvmmError as err:
        sup.log(f"reload: {err}: nothing changed")
    else:
        for note in notes or ["nothing to change"]:
            sup.log(f"reload: {note}")
    notify("READY=1", f"STATUS={len(sup.partitions)} partitions, control socket {path}")


def api_services(server, sup, hypercalls, on_down: Callable[[], None]) -> Callable[[], None]:
    """What the services beside the supervisor add to the control API: their routes
    (partitions created and destroyed at run time, write monitoring, snapshots,
    migration, the live upgrade's handover), the fields they add to a partition's
    statistics, their metrics. Returns what releases what they hold."""
    from osvmm.up.hypercalls import hypercall_counts
    from osvmm.up.metrics import hypercall_metrics, service_metrics
    from osvmm.up.migrate import MigrationService, TakeoverService
    from osvmm.up.runtime import RuntimePartitions
    from osvmm.up.snapshots import SnapshotService
    from osvmm.up.writemon import WriteMonitors

    monitors = WriteMonitors(sup)  # write monitoring (docs/write-monitor.md)
    snapshots = SnapshotService(sup, hypercalls)  # snapshots (docs/snapshots.md)
    migrations = MigrationService(sup, hypercalls)
    takeovers = TakeoverService(sup, hypercalls, on_down)
    runtime = RuntimePartitions(sup, monitors, hypercalls)
    for service in (runtime, monitors, snapshots, migrations, takeovers):
        server.add_routes(service.routes())
    server.stat_fields = (monitors.stat_fields, hypercall_counts(hypercalls))
    server.metric_sources = [
        lambda: hypercall_metrics(hypercalls, sup),
        lambda: service_metrics(snapshots, migrations, monitors),
    ]
    return runtime.close


def _log_thread_bug(sup) -> Callable:
    """A thread that ends on an exception (a bug: every thread of the VMM catches
    what it expects) is one line on stderr and its traceback in osvmm.log."""
    from osvmm.errors import VmmBug

    def hook(args) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        name = args.thread.name if args.thread is not None else "a thread"
        bug = VmmBug.from_exception(f"thread {name}", args.exc_value)
        sup.log(str(bug))
        sup.log_file_only(bug.traceback_text.rstrip("\n"))

    return hook
