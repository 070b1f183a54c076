"""The CLI over TCP: ``osvmm VERB --connect HOST:PORT --token-file FILE`` (or
``$OSVMM_CONNECT``, ``$OSVMM_TOKEN_FILE``) reaches the VMM of ``osvmm up
--listen HOST:PORT --token-file FILE`` through the same client as the Unix
socket (osvmm/up/protocol.py), the console upgrade included (docs/api.md)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_osvmm

TOKEN = "c0ffee00" * 4

PLAN = """
[[partition]]
name = "counter"
cpus = "floating"
memory = "8M"
image = "guests:counter"
cmdline = "every=0x4000000"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_file(tmp_path, text: str = TOKEN, mode: int = 0o600):
    path = tmp_path / "token"
    path.write_text(text + "\n")
    path.chmod(mode)
    return str(path)


# -- without a VMM: the options are checked first, each error one line ---------------------------


def one_line_error(r, text: str) -> None:
    assert r.returncode == 2, r
    assert r.stderr.startswith(b"osvmm: error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert text in r.stderr.decode(), r.stderr


@pytest.mark.parametrize(
    "args, text",
    [
        (["--connect", "127.0.0.1:1"], "--connect 127.0.0.1:1: the VMM's token is needed"),
        (["--connect", "nohost"], "--connect 'nohost': write HOST:PORT"),
        (["--connect", "h:1", "--socket", "/x"], "--socket and --connect: give one way"),
        (["--token-file", "/x"], "--token-file goes with --connect HOST:PORT"),
        (["--connect", "h:1", "--token-file", "/nonexistent"], "--token-file /nonexistent: No"),
    ],
)
def test_connect_options_are_checked_with_one_line_errors(args, text):
    one_line_error(run_osvmm("ps", *args), text)


@pytest.mark.parametrize(
    "text, mode, error",
    [
        (TOKEN, 0o640, "readable by others or not yours (mode 0640, uid "),
        ("short", 0o600, "the token is one line of at least 16 visible ASCII characters"),
    ],
)
def test_the_client_checks_its_token_file_as_the_vmm_does(tmp_path, text, mode, error):
    path = token_file(tmp_path, text, mode)
    one_line_error(run_osvmm("ps", "--connect", "127.0.0.1:1", "--token-file", path), error)


def test_a_refused_connection_is_one_line(tmp_path):
    port = free_port()
    r = run_osvmm("ps", "--connect", f"127.0.0.1:{port}", "--token-file", token_file(tmp_path))
    one_line_error(r, f"no VMM is listening on 127.0.0.1:{port}: connection refused")


def test_the_environment_names_the_vmm_and_its_token(tmp_path, monkeypatch):
    port = free_port()
    monkeypatch.setenv("OSVMM_CONNECT", f"127.0.0.1:{port}")
    monkeypatch.delenv("OSVMM_TOKEN_FILE", raising=False)
    one_line_error(run_osvmm("ps"), f"OSVMM_CONNECT 127.0.0.1:{port}: the VMM's token is needed")
    monkeypatch.setenv("OSVMM_TOKEN_FILE", token_file(tmp_path, mode=0o644))
    one_line_error(run_osvmm("ps"), "OSVMM_TOKEN_FILE ")
    monkeypatch.setenv("OSVMM_TOKEN_FILE", token_file(tmp_path))
    one_line_error(run_osvmm("ps"), f"no VMM is listening on 127.0.0.1:{port}")
    # --socket goes before the environment
    one_line_error(run_osvmm("ps", "--socket", "/nonexistent.sock"), "/nonexistent.sock")


# -- a real VMM on TCP ------------------------------------------------------------------------


@pytest.mark.kvm
def test_every_verb_reaches_a_vmm_on_tcp(tmp_path):
    from tests.test_supervisor_up import UpProcess

    port = free_port()
    token = token_file(tmp_path)
    where = ["--connect", f"127.0.0.1:{port}", "--token-file", token]

    class TcpUp(UpProcess):
        def _popen(self, argv, env):
            extra = ["--listen", f"127.0.0.1:{port}", "--token-file", token]
            return super()._popen([*argv, *extra], env)

    up = TcpUp(PLAN)
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")

        def cli(*args, **kw):
            return run_osvmm(*args, *where, **kw)

        r = cli("ps", "--json")
        assert r.returncode == 0, r.stderr
        (p,) = json.loads(r.stdout)["partitions"]
        assert p["name"] == "counter" and p["state"] == "running"
        r = cli("stop", "counter")
        assert r.returncode == 0 and r.stdout.startswith(b"counter: stopped"), r.stderr
        r = cli("start", "counter")
        assert (r.returncode, r.stdout) == (0, b"counter: running\n"), r.stderr
        r = cli("stat", "counter", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["partitions"][0]["live"] is True
        r = cli("metrics")
        assert r.returncode == 0 and b'osvmm_partition_state{partition="counter"' in r.stdout

        # the console upgrade, over TCP: output streams, Ctrl-A x detaches
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen(
            [sys.executable, "-m", "osvmm.cli", "console", "counter", *where],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            line = proc.stdout.readline()
            assert re.fullmatch(rb"counter: \d+\n", line), line
            proc.stdin.write(b"\x01x")
            proc.stdin.flush()
            assert proc.wait(timeout=10) == 0
            assert "console of counter (Ctrl-A x detaches)" in proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

        # a wrong token: the VMM's 401, one line; nothing done
        wrong = tmp_path / "wrong"
        wrong.mkdir()
        bad = ["--connect", f"127.0.0.1:{port}", "--token-file", token_file(wrong, "x" * 32)]
        r = run_osvmm("stop", "counter", *bad)
        one_line_error(r, "a request on TCP needs Authorization: Bearer TOKEN (the VMM's token)")
        assert up.ps()["counter"]["state"] == "running"

        # the environment, in place of the options; down ends the VMM
        env_run = dict(OSVMM_CONNECT=f"127.0.0.1:{port}", OSVMM_TOKEN_FILE=token)
        r = subprocess.run(
            [sys.executable, "-m", "osvmm.cli", "down"],
            capture_output=True,
            timeout=90,
            env=dict(os.environ, PYTHONPATH=str(REPO), **env_run),
        )
        assert r.returncode == 0 and r.stderr == b"osvmm: down\n", r.stderr
        assert up.proc.wait(timeout=30) == 0
    finally:
        status, _, err = up.close()
    assert "Traceback" not in err, err
