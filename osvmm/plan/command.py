"""``osvmm plan FILE [--host-sysfs DIR] [--svg FILE]``: check a plan and show where it
would run (as text; and drawn, osvmm/plan/svg.py).

The CLI wires it with one call: ``add_plan_parser(subparsers)``; the parser's
``func`` default is ``cmd_plan``. Bad plans raise ConfigError (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from osvmm.files import input_problem
from osvmm.plan.config import load_plan
from osvmm.plan.placement import place
from osvmm.plan.render import render_assignment
from osvmm.plan.topology import read_topology


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to an ``add_subparsers()`` result."""
    p = subparsers.add_parser(
        "plan",
        help="check a partition plan and show its placement on this host",
        description="Read a partition plan (TOML), check it against the host's CPUs, "
        "NUMA nodes and memory, and print which host CPUs and memory each partition "
        "gets. Starts nothing. docs/config.md documents the plan file.",
    )
    p.add_argument("file", metavar="FILE", help="the plan file (TOML)")
    p.add_argument(
        "--host-sysfs",
        metavar="DIR",
        default="/sys",
        help="read the host topology from this sysfs tree instead of /sys",
    )
    p.add_argument(
        "--svg",
        metavar="FILE",
        help="also draw the placement into FILE (SVG: nodes, cores, memory, channels)",
    )
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the assignment and its warnings; ConfigError for a bad plan or host tree."""
    plan = load_plan(args.file)
    topology = read_topology(args.host_sysfs)
    assignment = place(plan, topology)
    text = render_assignment(assignment, topology)
    missing = [
        f"warning: partition {spec.name!r}: {key}: {path} {_describe(problem)}"
        for spec in plan.partitions
        for key, path in (("image", spec.image), ("kernel", spec.kernel), ("initrd", spec.initrd))
        if path is not None
        and not (key == "image" and spec.bundled_guest)
        and (problem := input_problem(path)) is not None
    ]
    if missing:
        text += ("\n" if not assignment.warnings else "") + "\n".join(missing) + "\n"
    if getattr(args, "svg", None):
        write_svg(args.svg, assignment, topology)
    (out or sys.stdout).write(text)
    return 0


def write_svg(path: str, assignment, topology) -> None:
    """The picture into ``path``, whole or not at all (a temporary file renamed)."""
    import os

    from osvmm.errors import ConfigError
    from osvmm.plan.svg import render_svg

    data = render_svg(assignment, topology).encode()
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ConfigError(f"--svg {path}: cannot write: {e.strerror or e}") from None


def _describe(problem: str) -> str:
    """'does not exist (yet)' for a missing file, else what is wrong with it."""
    if problem.startswith("no such file"):
        return "does not exist (yet)"
    return problem if problem.startswith("is ") else f"cannot be read: {problem}"
