"""``osvmm verify``: model-check the hypercall monitor.

Exit status 0 when every invariant holds in every explored state, 1 when one
is violated (the shortest call sequence reaching it is printed), 2 for bad
arguments (an OsvmmError, as everywhere in the CLI).
"""

from __future__ import annotations

import argparse

from osvmm.errors import ConfigError
from osvmm.hypercall import checker, mutants


def add_verify_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "verify",
        help="model-check the hypercall interface",
        description=(
            "Explore every sequence of hypercalls (adversarial arguments, every partition) "
            "of a bounded configuration and check the monitor's invariants after each call."
        ),
    )
    p.add_argument(
        "--depth",
        type=int,
        default=checker.DEFAULT_DEPTH,
        help=f"longest call sequence explored (default {checker.DEFAULT_DEPTH})",
    )
    p.add_argument(
        "--partitions",
        type=int,
        default=checker.DEFAULT_PARTITIONS,
        help=f"partitions in the configuration, 3..{checker.MAX_PARTITIONS} "
        f"(default {checker.DEFAULT_PARTITIONS})",
    )
    p.add_argument(
        "--mutant",
        metavar="NAME",
        help="check a monitor with a deliberate bug instead ('list' lists them)",
    )
    p.set_defaults(func=cmd_verify)
    return p


def cmd_verify(args: argparse.Namespace) -> int:
    step_fn = None
    if args.mutant == "list":
        for m in mutants.MUTANTS:
            print(f"{m.name:30} {m.description}")
        return 0
    if args.mutant is not None:
        mutant = mutants.BY_NAME.get(args.mutant)
        if mutant is None:
            raise ConfigError(f"--mutant {args.mutant}: unknown (see --mutant list)")
        step_fn = mutants.mutant_step(mutant)
        print(f"mutant {mutant.name}: {mutant.description}")
    config = checker.default_config(args.partitions)
    kwargs = {} if step_fn is None else {"step_fn": step_fn}
    result = checker.check(config, depth=args.depth, **kwargs)
    print(checker.format_result(result))
    return 0 if result.ok else 1
