"""``osvmm up`` and the commands that talk to it over the control socket.

    osvmm up FILE [--detach] [--log-dir DIR] [--quiet]
    osvmm ps | stat [NAME] | start NAME | stop NAME | restart NAME | console NAME | down
    osvmm protect NAME [--arm | --disarm] [--policy P] [--range R] [--domain D=R] [--grant D=R]
    osvmm violations NAME [--last N]
    osvmm snapshot NAME DIR | migrate NAME --to ADDR | top | metrics
    osvmm create FRAGMENT | destroy NAME

The CLI wires them with one call: ``add_up_parsers(subparsers)``. Every
client command finds the VMM by ``--socket PATH``, else by the
``control_socket`` of ``--plan FILE``, else on TCP at ``--connect HOST:PORT``
with the token of ``--token-file FILE`` (or ``$OSVMM_CONNECT`` and
``$OSVMM_TOKEN_FILE``: the VMM of ``osvmm up --listen``), else at
``osvmm.plan.config.default_control_socket()``. docs/partitions.md is the guide.

Each command here is thin: ``up`` hands over to osvmm/up/daemon.py, ``console``
to osvmm/up/console_client.py; the others send one request and print the
answer (osvmm/up/tables.py draws ``ps`` and ``stat``); ``top`` is
osvmm/up/top.py. Each is a client of the HTTP API (docs/api.md).
"""

from __future__ import annotations

import json
import sys
import time

from osvmm.stdio import say
from osvmm.up.protocol import call, is_listening, partition_path


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
    p.add_argument(
        "--incoming",
        metavar="ADDR",
        help="start no partition: accept live migrations of the plan's partitions at ADDR "
        "(unix:PATH or tcp:HOST:PORT)",
    )
    p.add_argument(
        "--takeover",
        action="store_true",
        help="take every running partition of the VMM on the plan's control socket, "
        "memory handed over, not copied (a live upgrade); it ends, this one serves",
    )
    p.add_argument(
        "--group",
        metavar="GROUP",
        help="give the control socket to GROUP too (mode 0660): its members may drive the VMM",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="serve the control API on TCP too (every request with the token of --token-file)",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="the bearer token of the TCP API: a 0600 file of one line (docs/api.md)",
    )
    p.set_defaults(func=cmd_up)

    def client(name: str, help_: str, with_name: str | None = None):
        c = sub.add_parser(name, help=help_, description=help_)
        if with_name == "required":
            c.add_argument("name", metavar="NAME", help="the partition")
        elif with_name == "optional":
            c.add_argument("name", metavar="NAME", nargs="?", help="only this partition")
        c.add_argument("--socket", metavar="PATH", help="the VMM's control socket")
        c.add_argument("--plan", metavar="FILE", help="find the control socket in this plan")
        c.add_argument(
            "--connect",
            metavar="HOST:PORT",
            help="the VMM's control API on TCP (osvmm up --listen); default $OSVMM_CONNECT",
        )
        c.add_argument(
            "--token-file",
            metavar="FILE",
            help="the token of --connect: a 0600 file of one line; default $OSVMM_TOKEN_FILE",
        )
        return c

    c = client("ps", "list the partitions of the running VMM")
    c.add_argument("--json", action="store_true", help="print the VMM's JSON answer")
    c.set_defaults(func=cmd_ps)
    for name, what in (
        ("start", "boot a stopped partition"),
        ("stop", "stop a partition"),
        ("restart", "stop a partition and boot it afresh"),
    ):
        c = client(name, what, "required")
        c.set_defaults(func=cmd_lifecycle, command=name, restore=None)
        if name == "start":
            c.add_argument(
                "--restore",
                metavar="DIR",
                help="resume the snapshot in DIR instead of booting, this once (docs/snapshots.md)",
            )
    client(
        "console", "attach to a partition's serial console (Ctrl-A x detaches)", "required"
    ).set_defaults(func=cmd_console)
    c = client("stat", "exit statistics per partition: KVM's and the VMM's", "optional")
    c.add_argument("--json", action="store_true", help="print the VMM's JSON answer")
    c.set_defaults(func=cmd_stat)
    client("down", "stop every partition and end the VMM").set_defaults(func=cmd_down)
    add_writemon_parsers(client)
    c = client(
        "snapshot",
        "pause a partition, write a snapshot of it into DIR, and let it go on (docs/snapshots.md)",
        "required",
    )
    c.add_argument("dir", metavar="DIR", help="the snapshot directory (created if needed)")
    c.add_argument("--stop", action="store_true", help="stop the partition after it")
    c.add_argument("--json", action="store_true", help="print the VMM's JSON answer")
    c.set_defaults(func=cmd_snapshot)
    c = client(
        "migrate",
        "move a running partition live to the VMM at ADDR (osvmm up --incoming ADDR)",
        "required",
    )
    c.add_argument("--to", required=True, metavar="ADDR", help="unix:PATH or tcp:HOST:PORT")
    c.add_argument(
        "--downtime-ms",
        type=float,
        default=300,
        metavar="MS",
        help="stop and copy once what is left fits this pause (300)",
    )
    c.add_argument("--json", action="store_true", help="print the VMM's JSON answer")
    c.set_defaults(func=cmd_migrate)
    c = client(
        "create",
        "add the partitions of a plan fragment to the running VMM, and start them",
    )
    c.add_argument("fragment", metavar="FRAGMENT", help="plan text with [[partition]] tables")
    c.add_argument("--no-start", action="store_true", help="make them, leave them stopped")
    c.set_defaults(func=cmd_create)
    client(
        "destroy", "stop a partition and remove it from the VMM, freeing its CPUs", "required"
    ).set_defaults(func=cmd_destroy)
    c = client("top", "a live view of the partitions: state, CPUs, exits/s, hypercalls/s (q quits)")
    c.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (1)"
    )
    c.add_argument("--once", action="store_true", help="print one frame and end")
    c.set_defaults(func=cmd_top)
    c = client("metrics", "the VMM's metrics in Prometheus's text format, or served for scrapes")
    c.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="serve GET /metrics (only) there, for a Prometheus server (docs/operations.md)",
    )
    c.set_defaults(func=cmd_metrics)


def add_writemon_parsers(client) -> None:
    """``protect`` and ``violations`` (docs/write-monitor.md)."""
    c = client(
        "protect",
        "show or change a partition's write protection (ranges, domains, grants, policy), "
        "arm or disarm it",
        "required",
    )
    arm = c.add_mutually_exclusive_group()
    arm.add_argument("--arm", dest="arm", action="store_const", const=True, help="arm it now")
    arm.add_argument("--disarm", dest="arm", action="store_const", const=False, help="disarm it")
    c.add_argument("--policy", choices=("log", "deny", "fault"), help="what a violation does")
    c.add_argument(
        "--range", action="append", default=[], metavar="R", help="protect R (repeatable)"
    )
    c.add_argument(
        "--domain", action="append", default=[], metavar="NAME=R", help="code range R of NAME"
    )
    c.add_argument(
        "--grant", action="append", default=[], metavar="NAME=R", help="NAME may write R"
    )
    c.add_argument("--json", action="store_true", help="print the VMM's JSON answer")
    c.set_defaults(func=cmd_protect)
    c = client("violations", "the write monitor's violation records of a partition", "required")
    c.add_argument(
        "--last", type=int, default=50, metavar="N", help="the last N records (50, at most 200)"
    )
    c.add_argument(
        "--since", type=int, metavar="SEQ", help="instead the first N numbered SEQ or later"
    )
    c.add_argument("--json", action="store_true", help="print the VMM's JSON answer")
    c.set_defaults(func=cmd_violations)


def control_of(args):
    """Where the VMM of a client command is: a Unix socket's path, or a ``Remote``
    (``--connect`` with ``--token-file``, else ``$OSVMM_CONNECT`` with
    ``$OSVMM_TOKEN_FILE``; ``--socket`` or ``--plan`` go before the environment)."""
    import os

    from osvmm.errors import ConfigError
    from osvmm.plan.config import default_control_socket, load_plan
    from osvmm.up.protocol import Remote, parse_host_port, read_token

    socket_, plan = getattr(args, "socket", None), getattr(args, "plan", None)
    connect, token_file = getattr(args, "connect", None), getattr(args, "token_file", None)
    given = [o for o, v in (("--socket", socket_), ("--plan", plan), ("--connect", connect)) if v]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)}: give one way to the VMM")
    if token_file and not connect:
        raise ConfigError("--token-file goes with --connect HOST:PORT")
    if socket_:
        return socket_
    if plan:
        return load_plan(plan).vmm.control_socket
    option, token_option = "--connect", "--token-file"
    if not connect and os.environ.get("OSVMM_CONNECT"):
        connect, option = os.environ["OSVMM_CONNECT"], "OSVMM_CONNECT"
    if not connect:
        return default_control_socket()
    host, port = parse_host_port(connect, option)
    if not token_file and os.environ.get("OSVMM_TOKEN_FILE"):
        token_file, token_option = os.environ["OSVMM_TOKEN_FILE"], "OSVMM_TOKEN_FILE"
    if not token_file:
        raise ConfigError(
            f"{option} {connect}: the VMM's token is needed: --token-file FILE "
            "(or OSVMM_TOKEN_FILE)"
        )
    return Remote(host, port, read_token(token_file, token_option))


# -- the commands -----------------------------------------------------------------------------


def cmd_up(args) -> int:
    from osvmm.up.daemon import up

    return up(
        args.file,
        args.log_dir,
        args.detach,
        args.quiet,
        args.incoming,
        args.takeover,
        args.group,
        args.listen,
        args.token_file,
    )


def cmd_ps(args) -> int:
    reply = call(control_of(args), "GET", "/v1/vmm")
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    from osvmm.up.tables import format_ps

    sys.stdout.write(format_ps(reply["partitions"], reply.get("lost", {})))
    return 0


def cmd_lifecycle(args) -> int:
    import os

    body = {"restore": os.path.abspath(args.restore)} if args.restore else None
    target = partition_path(args.name, args.command)
    timeout = SNAPSHOT_TIMEOUT_S if body else 60  # a restore reads the whole snapshot
    reply = call(control_of(args), "POST", target, body, timeout=timeout)
    detail = f" ({reply['reason']})" if reply["state"] != "running" and reply["reason"] else ""
    print(f"{args.name}: {reply['state']}{detail}")
    return 0


def cmd_stat(args) -> int:
    if args.name is None:
        reply = call(control_of(args), "GET", "/v1/stat")
    else:
        reply = {"partitions": [call(control_of(args), "GET", partition_path(args.name, "stat"))]}
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    from osvmm.up.tables import format_stat

    sys.stdout.write(format_stat(reply["partitions"]))
    return 0


def cmd_down(args) -> int:
    """Ask the VMM to end; return once it has (its lock file released: every
    partition stopped, its logs closed), or after 60 s."""
    from osvmm.up.locks import holder
    from osvmm.up.protocol import Remote

    path = control_of(args)
    call(path, "POST", "/v1/down")
    deadline = time.monotonic() + 60

    def ending() -> bool:  # on TCP the lock file is out of sight: the listener is watched
        local = not isinstance(path, Remote)
        return (local and holder(path + ".lock") is not None) or is_listening(path)

    while ending() and time.monotonic() < deadline:
        time.sleep(0.1)
    say("osvmm: down")
    return 0


def cmd_console(args) -> int:
    from osvmm.up.console_client import attach

    return attach(control_of(args), args.name)


SNAPSHOT_TIMEOUT_S = 600  # a large partition's memory takes a while to write


def cmd_snapshot(args) -> int:
    import os

    msg = {"dir": os.path.abspath(args.dir)}
    if args.stop:
        msg["stop"] = True
    target = partition_path(args.name, "snapshot")
    reply = call(control_of(args), "POST", target, msg, timeout=SNAPSHOT_TIMEOUT_S)
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    print(
        f"{args.name}: snapshot in {reply['dir']}: {reply['stored'] >> 10} KiB of "
        f"{reply['memory'] >> 20} MiB memory stored, paused {reply['paused_ms']:.1f} ms; "
        f"{reply['state']}"
    )
    return 0


def cmd_migrate(args) -> int:
    from osvmm.snapshot.stream import parse_address

    parse_address(args.to)  # a typo is told here, before the VMM is asked
    msg = {"to": args.to, "downtime_ms": args.downtime_ms}
    target = partition_path(args.name, "migrate")
    reply = call(control_of(args), "POST", target, msg, timeout=SNAPSHOT_TIMEOUT_S)
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    print(
        f"{args.name}: migrated to {reply['to']} in {reply['rounds']} rounds "
        f"({reply.get('dirty_log') or 'dirty log'}), "
        f"{reply['bytes'] / (1 << 20):.1f} MiB sent, {reply['total_ms']:.0f} ms, "
        f"downtime {reply['downtime_ms']:.1f} ms; here {reply['state']}"
    )
    return 0


def _named_ranges(pairs: list[str], option: str) -> dict[str, list[str]]:
    from osvmm.errors import ConfigError

    out: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, rng = pair.partition("=")
        if not sep or not name or not rng:
            raise ConfigError(f"{option} {pair!r}: write NAME=RANGE")
        out.setdefault(name, []).append(rng)
    return out


def cmd_protect(args) -> int:
    msg: dict = {}
    if args.arm is not None:
        msg["arm"] = args.arm
    if args.policy:
        msg["policy"] = args.policy
    if args.range:
        msg["ranges"] = args.range
    if args.domain:
        msg["domains"] = _named_ranges(args.domain, "--domain")
    if args.grant:
        msg["grants"] = _named_ranges(args.grant, "--grant")
    target = partition_path(args.name, "protection")
    path = control_of(args)
    reply = call(path, "POST", target, msg) if msg else call(path, "GET", target)
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    from osvmm.up.tables import format_protection

    sys.stdout.write(format_protection(reply))
    return 0


def cmd_violations(args) -> int:
    query = f"?last={args.last}" + (f"&since={args.since}" if args.since is not None else "")
    reply = call(control_of(args), "GET", partition_path(args.name, "violations") + query)
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    from osvmm.up.tables import format_violations

    sys.stdout.write(format_violations(reply))
    return 0


def cmd_top(args) -> int:
    from osvmm.up.top import top

    return top(control_of(args), args.interval, args.once)


def cmd_metrics(args) -> int:
    from osvmm.up.exporter import metrics

    return metrics(control_of(args), args.listen)


def cmd_create(args) -> int:
    import os

    from osvmm.errors import ConfigError
    from osvmm.files import read_input
    from osvmm.up.runtime import MAX_FRAGMENT

    data = read_input(args.fragment, f"fragment {args.fragment}", MAX_FRAGMENT, ConfigError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"fragment {args.fragment}: not UTF-8 text") from None
    base = os.path.dirname(os.path.abspath(args.fragment))
    body = {"plan": text, "base_dir": base, "start": not args.no_start}
    reply = call(control_of(args), "POST", "/v1/partitions", body)
    for p in reply["partitions"]:
        detail = f" ({p['reason']})" if p["state"] != "running" and p["reason"] else ""
        cpus = p["cpus"] if p["cpus"] != "floating" else f"floating({p['pool']})"
        print(f"{p['name']}: {p['state']}{detail} on CPUs {cpus}, node {p['node']}")
    for c in reply.get("channels", ()):
        members = ", ".join(f"{name} {mode}" for name, mode in c["members"].items())
        print(f"channel {c['name']}: id {c['id']}, {c['size'] >> 10} KiB, {members}")
    for g in reply.get("doorbells", ()):
        print(f"doorbell: {g['from']} may ring {g['to']}")
    return 0


def cmd_destroy(args) -> int:
    reply = call(control_of(args), "DELETE", partition_path(args.name))
    freed = f"CPUs {reply['cpus']} and " if reply["cpus"] else ""
    gone = reply.get("channels")
    withdrawn = f"; channels {', '.join(gone)} withdrawn" if gone else ""
    print(f"{args.name}: destroyed; {freed}{reply['memory'] >> 20} MiB of memory freed{withdrawn}")
    return 0
