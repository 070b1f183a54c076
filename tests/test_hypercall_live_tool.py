"""tools/osvmm-hc.c, the Linux side: it builds statically, its call numbers are the
ABI table's, and bad usage is a one-line message with status 2 (it makes no
hypercall here: this host is not a partition)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from osvmm.hypercall import abi

TOOL = Path(__file__).resolve().parent.parent / "tools" / "osvmm-hc.c"


@pytest.fixture(scope="module")
def tool(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("tool") / "osvmm-hc"
    cmd = ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(TOOL)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode and "cannot find -lc" in proc.stderr:
        pytest.skip("no static libc (Debian package libc6-dev)")
    assert proc.returncode == 0, proc.stderr
    return out


def test_call_numbers_and_port_match_the_abi_table():
    src = TOOL.read_text()
    enum = re.search(r"enum \{ ([A-Z_, ]+) \};", src).group(1).replace(" ", "").split(",")
    assert enum == [c.name for c in abi.HYPERCALLS]
    assert f"#define HC_PORT {abi.HYPERCALL_PORT:#x}" in src
    assert f"#define ATTACH_READONLY {abi.ATTACH_READONLY}" in src


@pytest.mark.parametrize("args", [[], ["attach"], ["frobnicate", "1"], ["ring", "1"]])
def test_bad_usage_is_status_2_before_any_hypercall(tool, args):
    r = subprocess.run([str(tool), *args], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("usage: osvmm-hc")
    assert r.stdout == ""
