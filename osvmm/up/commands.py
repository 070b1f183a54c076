"""``osvmm up`` and the commands that talk to it over the control socket.

    osvmm up FILE [--detach] [--log-dir DIR] [--quiet]
    osvmm ps | stat [NAME] | start NAME | stop NAME | restart NAME | console NAME | down

The CLI wires them with one call: ``add_up_parsers(subparsers)``. Every
client command finds the VMM by ``--socket PATH``, else by the
``control_socket`` of ``--plan FILE``, else at
``osvmm.plan.config.default_control_socket()``. docs/partitions.md is the guide.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
import time

from osvmm.errors import OsvmmError
from osvmm.up.protocol import ControlError, connect, exchange, is_listening, request
from osvmm.vmm.escape import ConsoleEscape


def add_up_parsers(sub) -> None:
    p = sub.add_parser(
        "up",
        help="run every partition of a plan in one VMM process",
        description="Check a plan against this host, then boot each partition on its "
        "CPUs and memory and serve the control socket until 'osvmm down' (or Ctrl-C). "
        "Consoles are logged to <log_dir>/<name>.console.log and, in the foreground, "
        "printed line by line as 'NAME | line'.",
    )
    p.add_argument("file", metavar="FILE", help="the plan file (TOML, docs/config.md)")
    p.add_argument("--detach", "-d", action="store_true", help="run in the background")
    p.add_argument("--log-dir", metavar="DIR", help="console and event logs (default below)")
    p.add_argument("--quiet", "-q", action="store_true", help="do not print the consoles")
    p.set_defaults(func=cmd_up)

    def client(name: str, help_: str, with_name: str | None = None):
        c = sub.add_parser(name, help=help_, description=help_)
        if with_name == "required":
            c.add_argument("name", metavar="NAME", help="the partition")
        elif with_name == "optional":
            c.add_argument("name", metavar="NAME", nargs="?", help="only this partition")
        c.add_argument("--socket", metavar="PATH", help="the VMM's control socket")
        c.add_argument("--plan", metavar="FILE", help="find the control socket in this plan")
        return c

    c = client("ps", "list the partitions of the running VMM")
    c.add_argument("--json", action="store_true", help="print the VMM's JSON answer")
    c.set_defaults(func=cmd_ps)
    for name, what in (
        ("start", "boot a stopped partition"),
        ("stop", "stop a partition"),
        ("restart", "stop a partition and boot it afresh"),
    ):
        client(name, what, "required").set_defaults(func=cmd_lifecycle, command=name)
    client(
        "console", "attach to a partition's serial console (Ctrl-A x detaches)", "required"
    ).set_defaults(func=cmd_console)
    c = client("stat", "exit statistics per partition: KVM's and the VMM's", "optional")
    c.add_argument("--json", action="store_true", help="print the VMM's JSON answer")
    c.set_defaults(func=cmd_stat)
    client("down", "stop every partition and end the VMM").set_defaults(func=cmd_down)


def socket_path(args) -> str:
    from osvmm.plan.config import default_control_socket, load_plan

    if getattr(args, "socket", None):
        return args.socket
    if getattr(args, "plan", None):
        return load_plan(args.plan).vmm.control_socket
    return default_control_socket()


# -- osvmm up --------------------------------------------------------------------------------


def cmd_up(args) -> int:
    from osvmm.plan.config import load_plan
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology
    from osvmm.up.partition_config import check_boot
    from osvmm.up.supervisor import default_log_dir

    plan = load_plan(args.file)
    assignment = place(plan, read_topology("/sys"))
    for warning in assignment.warnings:
        print(f"osvmm: warning: {warning}", file=sys.stderr)
    check_boot(assignment)  # every image loads and every boot prepares, before anything starts
    path = plan.vmm.control_socket
    if is_listening(path):
        raise ControlError(f"a VMM is already listening on {path} (osvmm down stops it)")
    log_dir = args.log_dir or plan.vmm.log_dir or default_log_dir(plan.source)
    if args.detach:
        return _detach(lambda ready: _serve(assignment, path, log_dir, True, ready))
    return _serve(assignment, path, log_dir, args.quiet, None)


def _detach(serve) -> int:
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
            status = serve(lambda msg: os.write(wfd, msg.encode() + b"\n"))
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


def _serve(assignment, path: str, log_dir: str, quiet: bool, ready) -> int:
    from osvmm.up.consoles import LineEcho
    from osvmm.up.server import ControlServer
    from osvmm.up.supervisor import Supervisor

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
    from osvmm.up.hypercalls import serve_supervisor

    hypercalls = serve_supervisor(sup)  # the six hypercalls, channels and doorbells
    server = ControlServer(path, sup, on_down=down.set)
    try:
        server.open()
        server.start()
        sup.log(f"up: {len(sup.partitions)} partitions, control socket {path}, logs in {log_dir}")
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
        sup.close()
        server.close()
        hypercalls.close()
    return 0


# -- the clients ------------------------------------------------------------------------------


def cmd_ps(args) -> int:
    reply = request(socket_path(args), {"cmd": "ps"})
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    from osvmm.up.tables import format_ps

    sys.stdout.write(format_ps(reply["partitions"]))
    return 0


def cmd_lifecycle(args) -> int:
    reply = request(socket_path(args), {"cmd": args.command, "name": args.name})
    detail = f" ({reply['reason']})" if reply["state"] != "running" and reply["reason"] else ""
    print(f"{args.name}: {reply['state']}{detail}")
    return 0


def cmd_stat(args) -> int:
    reply = request(socket_path(args), {"cmd": "stat", "name": args.name})
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    from osvmm.up.tables import format_stat

    sys.stdout.write(format_stat(reply["partitions"]))
    return 0


def cmd_down(args) -> int:
    path = socket_path(args)
    request(path, {"cmd": "down"})
    deadline = time.monotonic() + 60
    while is_listening(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    print("osvmm: down", file=sys.stderr)
    return 0


def cmd_console(args) -> int:
    import termios
    import tty

    path = socket_path(args)
    sock = connect(path, timeout=30)
    exchange(sock, {"cmd": "console", "name": args.name})
    sock.settimeout(None)
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    print(f"osvmm: console of {args.name} (Ctrl-A x detaches)", file=sys.stderr, flush=True)
    out = threading.Thread(target=_copy_out, args=(sock,), daemon=True)
    out.start()
    try:
        if saved is not None:
            tty.setraw(stdin)
        _copy_in(sock, stdin, out)
    except KeyboardInterrupt:
        pass
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        sock.close()
    print("\r\nosvmm: detached", file=sys.stderr)
    return 0


def _copy_out(sock) -> None:
    out = sys.stdout.buffer
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return
            out.write(data)
            out.flush()
    except OSError:
        return


def _copy_in(sock, stdin: int, out: threading.Thread) -> None:
    """Stdin to the console until Ctrl-A x, or the VMM closes; at stdin's EOF keep
    showing the output until the VMM closes the console (or Ctrl-C)."""
    escape = ConsoleEscape()
    stdin_open = True
    while out.is_alive():
        if not stdin_open:
            out.join(0.5)
            continue
        ready, _, _ = select.select([stdin], [], [], 0.5)
        if not ready:
            continue
        data = os.read(stdin, 1024)
        if not data:
            stdin_open = False
            continue
        data, detach = escape.feed(data)
        if data:
            sock.sendall(data)
        if detach:
            return
