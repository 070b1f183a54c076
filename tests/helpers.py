"""Helpers shared by tests that run the osvmm command or QEMU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from osvmm.guests.build import QEMU_MICROVM

REPO = Path(__file__).resolve().parent.parent

QEMU_CMD = list(QEMU_MICROVM)


def run_osvmm(*args: str, timeout: float = 120, input: bytes | None = None):
    """Run ``python3 -m osvmm.cli ARGS`` as a user would; returns CompletedProcess (bytes)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OSVMM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "osvmm.cli", *args],
        capture_output=True,
        timeout=timeout,
        env=env,
        input=input if input is not None else b"",
        cwd=str(REPO),
    )


def run_qemu(image: str, *extra: str, timeout: float = 120):
    return subprocess.run(
        [*QEMU_CMD, *extra, "-kernel", image],
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
