"""``GET /metrics``: Prometheus text that prometheus_client's own parser reads,
whose values move as the partitions run (needs /dev/kvm for a real ``osvmm
up``); and prometheus_client stays off every path but the scrape."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from osvmm.up.protocol import call, get_raw
from tests.helpers import REPO


def scrape(sock: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus_client's parser."""
    text = get_raw(sock, "/metrics").decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: dict, name: str, **labels) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_no_command_imports_prometheus_client_until_a_scrape():
    code = (
        "import sys, osvmm.cli, osvmm.up.daemon, osvmm.up.server, osvmm.up.commands, "
        "osvmm.up.top, osvmm.up.metrics\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()


PLAN = """
[[partition]]
name = "counter"
cpus = "floating"
memory = "8M"
image = "guests:counter"
cmdline = "every=0x100000"

[[partition]]
name = "ping"
cpus = "floating"
memory = "16M"
image = "guests:ping"
cmdline = "peer=2 chan=0 rounds=20"
doorbells = ["pong"]

[[partition]]
name = "pong"
cpus = "floating"
memory = "16M"
image = "guests:pong"
cmdline = "peer=1 chan=0"
doorbells = ["ping"]

[[channel]]
name = "link"
size = "64K"
members = { ping = "rw", pong = "rw" }
"""


@pytest.mark.kvm
def test_a_scrape_parses_and_its_values_move(tmp_path):
    from tests.test_supervisor_up import UpProcess

    up = UpProcess(PLAN)
    try:
        up.wait_for(
            lambda p: p["counter"]["state"] == "running" and p["ping"]["state"] == "stopped",
            timeout=60,
        )
        first = scrape(up.sock)
        assert value(first, "osvmm_partition_state", partition="counter", state="running") == 1
        assert value(first, "osvmm_partition_state", partition="counter", state="stopped") == 0
        assert value(first, "osvmm_partition_state", partition="ping", state="stopped") == 1
        assert value(first, "osvmm_partition_memory_bytes", partition="counter") == 8 << 20
        assert value(first, "osvmm_partition_vcpus", partition="counter") == 1
        assert value(first, "osvmm_partition_boots_total", partition="counter") == 1
        # ping's hypercalls, by call and result
        attach = {"partition": "ping", "call": "CHANNEL_ATTACH", "result": "0"}
        assert value(first, "osvmm_hypercalls_total", **attach) >= 1
        assert total(first, "osvmm_hypercalls_total", partition="ping", call="DOORBELL") >= 20
        assert total(first, "osvmm_hypercalls_total", partition="pong") > 0
        time.sleep(1.5)
        call(up.sock, "POST", "/v1/partitions/counter/snapshot", {"dir": str(tmp_path / "s")})
        second = scrape(up.sock)
        for name, labels in (
            ("osvmm_vcpu_exits_total", {"partition": "counter", "reason": "IoOut"}),
            ("osvmm_kvm_exits_total", {"partition": "counter", "stat": "exits"}),
            ("osvmm_console_bytes_total", {"partition": "counter"}),
            ("osvmm_partition_uptime_seconds", {"partition": "counter"}),
        ):
            assert total(second, name, **labels) > total(first, name, **labels), name
        assert value(second, "osvmm_snapshots_total", partition="counter") == 1
        assert total(first, "osvmm_snapshots_total") == 0
        call(up.sock, "POST", "/v1/partitions/counter/restart")
        third = scrape(up.sock)
        assert value(third, "osvmm_partition_boots_total", partition="counter") == 2
        call(up.sock, "POST", "/v1/partitions/counter/stop")
        fourth = scrape(up.sock)
        assert value(fourth, "osvmm_partition_state", partition="counter", state="stopped") == 1
        assert value(fourth, "osvmm_partition_uptime_seconds", partition="counter") == 0
        # osvmm metrics: the same text on stdout, or served for Prometheus
        r = up.cli("metrics")
        assert r.returncode == 0, r.stderr
        families = {f.name for f in text_string_to_metric_families(r.stdout.decode())}
        assert {"osvmm_partition_state", "osvmm_vcpu_exits", "osvmm_hypercalls"} <= families
        exporter_serves_only_metrics(up.sock)
    finally:
        status, _, err = up.close()
    assert "Traceback" not in err, err


def exporter_serves_only_metrics(sock: str) -> None:
    import os
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "osvmm.cli", "metrics", "--socket", sock]
    proc = subprocess.Popen(
        [*argv, "--listen", f"127.0.0.1:{port}"], stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stderr.readline().decode().startswith("osvmm: serving the metrics of ")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = r.read().decode()
        names = {f.name for f in text_string_to_metric_families(text)}
        assert "osvmm_partition_state" in names
        for path in ("/v1/vmm", "/v1/down"):  # nothing of the control API
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
            assert e.value.code == 404
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/down", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 501
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


def test_a_bad_listen_address_is_one_line():
    from tests.helpers import run_osvmm

    r = run_osvmm("metrics", "--socket", "/nonexistent/s", "--listen", "nowhere")
    assert r.returncode == 2
    assert r.stderr == b"osvmm: error: --listen 'nowhere': write HOST:PORT (127.0.0.1:9464)\n"
