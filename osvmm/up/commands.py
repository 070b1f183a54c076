"""``osvmm up`` and the commands that talk to it over the control socket.

    osvmm up FILE [--detach] [--log-dir DIR] [--quiet]
    osvmm ps | stat [NAME] | start NAME | stop NAME | restart NAME | console NAME | down

The CLI wires them with one call: ``add_up_parsers(subparsers)``. Every
client command finds the VMM by ``--socket PATH``, else by the
``control_socket`` of ``--plan FILE``, else at
``osvmm.plan.config.default_control_socket()``. docs/partitions.md is the guide.

Each command here is thin: ``up`` hands over to osvmm/up/daemon.py, ``console``
to osvmm/up/console_client.py; the others send one request and print the
answer (osvmm/up/tables.py draws ``ps`` and ``stat``).
"""

from __future__ import annotations

import json
import sys
import time

from osvmm.stdio import say
from osvmm.up.protocol import is_listening, request


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


# -- the commands -----------------------------------------------------------------------------


def cmd_up(args) -> int:
    from osvmm.up.daemon import up

    return up(args.file, args.log_dir, args.detach, args.quiet)


def cmd_ps(args) -> int:
    reply = request(socket_path(args), {"cmd": "ps"})
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    from osvmm.up.tables import format_ps

    sys.stdout.write(format_ps(reply["partitions"], reply.get("lost", {})))
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
    """Ask the VMM to end; return once it has (its lock file released: every
    partition stopped, its logs closed), or after 60 s."""
    from osvmm.up.locks import holder

    path = socket_path(args)
    request(path, {"cmd": "down"})
    deadline = time.monotonic() + 60
    while (holder(path + ".lock") is not None or is_listening(path)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    say("osvmm: down")
    return 0


def cmd_console(args) -> int:
    from osvmm.up.console_client import attach

    return attach(socket_path(args), args.name)
