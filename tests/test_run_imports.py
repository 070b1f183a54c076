"""What ``osvmm run`` imports: its cold start (docs/performance.md, "Cold start").

The modules below once cost a run's start 30-50 ms together and are not needed
to boot a guest: dataclasses (inspect, ast, dis, tokenize: osvmm/records.py has
the run path's classes), typing (collections.namedtuple for the exit records),
shutil (argparse's formatter imports it for the terminal's width: osvmm/cli.py
``_Formatter``). A module that brings one back fails here, with its name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_ON_THE_RUN_PATH = ("dataclasses", "inspect", "typing", "shutil")


def imported_by_a_run(argv: list[str]) -> set[str]:
    """The modules loaded once ``osvmm ARGV`` has parsed its arguments and imported
    what a run imports, in a fresh interpreter without ``site`` (whose .pth hooks
    are the environment's, not osvmm's)."""
    code = (
        "import json, sys\n"
        "from osvmm import cli\n"
        f"cli.build_parser({argv!r}).parse_args({argv!r})\n"
        "import osvmm.vmm.partition, osvmm.boot.prepare, osvmm.vmm.console, osvmm.guests\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return set(json.loads(out.stdout))


def test_a_run_imports_none_of_the_slow_modules():
    loaded = imported_by_a_run(["run", "guests:hello", "--memory", "16M"])
    assert "osvmm.vmm.partition" in loaded  # the check itself works
    assert sorted(m for m in NOT_ON_THE_RUN_PATH if m in loaded) == []


@pytest.mark.parametrize("columns", ["50", "120"])
def test_help_is_as_wide_as_columns_says(columns):
    env = {**os.environ, "COLUMNS": columns, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "osvmm.cli", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=REPO,
    )
    widest = max(len(line) for line in out.stdout.splitlines())
    assert int(columns) - 12 <= widest <= int(columns) - 2
