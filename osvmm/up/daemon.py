"""Starting the VMM of ``osvmm up``: check the plan, then serve in the foreground
or detached.

``up(plan_file, log_dir, detach, quiet)`` checks the plan against this host
(placement, every image loads, every boot prepares) before anything starts,
refuses a control socket another VMM answers on, then ``serve``s: the
supervisor, the hypercall interface and the control server, until ``down``,
SIGTERM or Ctrl-C. ``--detach`` forks first; the parent returns once the
child reports ``ready`` (or its one-line error) on a pipe.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

from osvmm.errors import ControlError, OsvmmError
from osvmm.up.protocol import is_listening


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
) -> int:
    from osvmm.plan.config import load_plan
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology
    from osvmm.up.partition_config import check_boot
    from osvmm.up.writemon import check_protection

    plan = load_plan(plan_file)
    assignment = place(plan, read_topology("/sys"))
    for warning in assignment.warnings:
        print(f"osvmm: warning: {warning}", file=sys.stderr)
    check_boot(assignment)  # every image loads and every boot prepares, before anything starts
    check_protection(assignment)  # every write-monitor range, symbol and grant resolves
    path = plan.vmm.control_socket
    if takeover and incoming is not None:
        raise ControlError("--takeover and --incoming: one or the other")
    if takeover and not is_listening(path):
        raise ControlError(f"--takeover: no VMM is listening on {path}")
    if not takeover and is_listening(path):
        raise ControlError(f"a VMM is already listening on {path} (osvmm down stops it)")
    log_dir = log_dir or plan.vmm.log_dir or default_log_dir(plan.source)
    if incoming is not None:
        from osvmm.snapshot.stream import parse_address

        parse_address(incoming)
    if detach:
        return detached(
            lambda ready: serve(assignment, path, log_dir, True, ready, incoming, takeover)
        )
    return serve(assignment, path, log_dir, quiet, None, incoming, takeover)


def detached(serve_: Callable[[Callable[[str], None]], int]) -> int:
    """Fork; the child serves, the parent waits for 'ready' (or the error) on a pipe."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        status = 2
        try:
            status = serve_(lambda msg: os.write(wfd, msg.encode() + b"\n"))
        except OsvmmError as err:
            os.write(wfd, f"error: {err}\n".encode())
        finally:
            os._exit(status)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        line = r.readline().decode().strip()
    if line.startswith("ready"):
        print(f"osvmm: {line[len('ready:') :].strip()} (pid {pid})", file=sys.stderr)
        return 0
    os.waitpid(pid, 0)
    raise ControlError(line[len("error: ") :] if line.startswith("error: ") else "the VMM died")


def serve(
    assignment, path: str, log_dir: str, quiet: bool, ready, incoming=None, takeover=False
) -> int:
    """Run every partition and the control socket until ``down``, SIGTERM or Ctrl-C.
    ``incoming``: start none, accept migrations of them at that address instead.
    ``takeover``: take every running partition of the VMM serving ``path`` (memory
    handed over, not copied), then serve its control socket when it has gone."""
    from osvmm.up.consoles import LineEcho
    from osvmm.up.hypercalls import serve_supervisor
    from osvmm.up.migrate import IncomingServer, MigrationService, TakeoverService, take_over
    from osvmm.up.server import ControlServer
    from osvmm.up.snapshots import SnapshotService
    from osvmm.up.supervisor import Supervisor
    from osvmm.up.writemon import WriteMonitors

    # The VMM's own threads (control, supervision, builds) stay off dedicated cores:
    # they run on the pool; each vCPU thread pins itself when it starts.
    if assignment.pool and any(p.cpus for p in assignment.partitions):
        os.sched_setaffinity(0, set(assignment.pool))
    down = threading.Event()
    sup = Supervisor(
        assignment,
        log_dir=log_dir,
        echo=None if quiet else LineEcho(sys.stdout),
        event_log=lambda text: print(f"osvmm: {text}", file=sys.stderr, flush=True),
    )
    hypercalls = serve_supervisor(sup)  # the six hypercalls, channels and doorbells
    monitors = WriteMonitors(sup)  # write monitoring (docs/write-monitor.md)
    snapshots = SnapshotService(sup, hypercalls)  # snapshots (docs/snapshots.md)
    server = ControlServer(
        path,
        sup,
        down.set,
        {
            **monitors.commands(),
            **snapshots.commands(),
            **MigrationService(sup, hypercalls).commands(),
            **TakeoverService(sup, hypercalls, down.set).commands(),
        },
        stat_fields=(monitors.stat_fields,),
    )
    receiver = None
    try:
        if takeover:
            reply = take_over(path, sup)
            sup.log(
                f"up: took over {len(reply['partitions'])} partitions from pid {reply['pid']} "
                f"(paused {reply['downtime_ms']:.1f} ms, {reply['bytes_copied']} bytes copied)"
            )
        server.open()
        if incoming is not None:
            receiver = IncomingServer(incoming, sup, sup.kvm)
        server.start()
        sup.log(f"up: {len(sup.partitions)} partitions, control socket {path}, logs in {log_dir}")
        if receiver is not None:
            receiver.start()
            sup.log(f"up: waiting for incoming migrations at {incoming}")
        elif not takeover:
            sup.start_all()
        if ready is not None:
            ready(f"ready: {len(sup.partitions)} partitions up, control socket {path}")
        signal.signal(signal.SIGTERM, lambda signum, frame: down.set())
        try:
            while not down.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        sup.log("down: stopping every partition")
    finally:
        if receiver is not None:
            receiver.close()
        sup.close()
        server.close()
        hypercalls.close()
    return 0
