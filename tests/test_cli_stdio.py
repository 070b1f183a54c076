"""The exit status does not depend on the state of the standard streams: stderr
closed or full, stdin or stdout closed, a reader of stdout that goes away; and
the interruptions end ``osvmm run`` with 130 (docs/exit-status.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import REPO


def shell(script: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """``script`` in bash, with ``osvmm`` a function running this checkout."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OSVMM_DEBUG", None)
    prelude = f'osvmm() {{ "{sys.executable}" -m osvmm.cli "$@"; }}\n'
    return subprocess.run(
        ["bash", "-c", prelude + script],
        capture_output=True,
        timeout=timeout,
        env=env,
        cwd=str(REPO),
        **kw,
    )


def test_a_usage_error_is_status_2_with_stderr_full_or_closed():
    r = shell("osvmm run --memory 1X guests:hello 2>/dev/full; echo $?")
    assert r.stdout.split() == [b"2"]
    r = shell("osvmm run --memory 1X guests:hello 2>&-; echo $?")
    assert r.stdout.split() == [b"2"]


@pytest.mark.kvm
def test_a_guest_fault_is_status_4_with_stderr_full():
    r = shell("osvmm run guests:triplefault 2>/dev/full; echo $?")
    assert r.stdout.splitlines()[-1] == b"4", r.stdout


@pytest.mark.kvm
def test_closed_stdin_or_stdout_changes_nothing():
    r = shell("osvmm run guests:hello <&-; echo status $?")
    assert r.stdout.splitlines() == [b"Hello from osvmm guest", b"status 1"], r
    assert b"internal error" not in r.stderr
    r = shell("osvmm run guests:hello >&-; echo status $? >&2")
    assert r.stderr.splitlines()[-1] == b"status 1", r.stderr


@pytest.mark.kvm
def test_a_reader_that_goes_away_ends_the_run_as_sigpipe_does():
    r = shell("osvmm run guests:counter | head -c1; s=${PIPESTATUS[0]}; echo; echo $s", timeout=60)
    assert r.stdout.split()[-1] == b"141", r  # 128 + SIGPIPE, as cat would
    assert b"Traceback" not in r.stderr and b"internal error" not in r.stderr


@pytest.mark.kvm
def test_ctrl_a_x_ends_a_run_with_130():
    r = shell(r"printf '\001x' | osvmm run --serial-input guests:counter >/dev/null; echo $?")
    assert r.stdout.split() == [b"130"], r


@pytest.mark.kvm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT])
def test_ending_signals_clean_up_and_give_130(sig):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "osvmm.cli", "run", "guests:counter"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=str(REPO),
    )
    assert proc.stdout.read(1)  # the guest runs
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    time.sleep(0.2)
    proc.send_signal(sig)
    assert proc.wait(30) == 130
    assert proc.stderr.read() == b""


def test_a_detached_vmm_outlives_a_parent_that_went_away(tmp_path):
    flag = tmp_path / "alive"
    script = (
        "import time\n"
        "from osvmm.up.daemon import detached\n"
        "def serve(ready):\n"
        "    time.sleep(1.0)\n"
        "    ready('ready: 1 partitions up')  # the parent is gone by now\n"
        f"    open({str(flag)!r}, 'w').write('alive')\n"
        "    return 0\n"
        "detached(serve)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=str(REPO))
    time.sleep(0.5)
    parent.kill()  # as Ctrl-C on `osvmm up -d` would, before the VMM was ready
    parent.wait()
    deadline = time.monotonic() + 10
    while not flag.exists():
        assert time.monotonic() < deadline, "the VMM died with its parent"
        time.sleep(0.05)
