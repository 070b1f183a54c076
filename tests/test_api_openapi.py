"""The control API against its contract, docs/openapi.yaml: the document is a
valid OpenAPI 3.1 document; the routes the server serves and the document's
operations are the same set; and a real ``osvmm up`` (bare-metal guests: a
counting partition, one that ends, a ping-pong pair making hypercalls) answers
every operation, successes and errors, with bodies that validate against the
document's schemas (openapi-schema-validator), with statuses it documents.
Requests are made with http.client (tests/helpers.py), not osvmm's own client."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec

from tests.helpers import REPO, UnixHTTPConnection, api

DOC = yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text())
METHODS = ("get", "post", "put", "patch", "delete")
# The statuses any route may answer besides its own (components.responses.Error).
GENERIC = {400, 401, 403, 404, 405, 408, 413, 431, 500, 501, 503, 505}


def operations() -> dict[str, tuple[str, str, dict]]:
    """operationId -> (METHOD, path, the operation)."""
    out = {}
    for path, item in DOC["paths"].items():
        for method in METHODS:
            if method in item:
                op = item[method]
                out[op["operationId"]] = (method.upper(), path, op)
    return out


def node_ref(ref: str) -> list[str]:
    assert ref.startswith("#/"), ref
    return ref[2:].split("/")


def resolve(node: dict) -> dict:
    while "$ref" in node:
        target = DOC
        for part in node_ref(node["$ref"]):
            target = target[part]
        node = target
    return node


def schema_check(value, schema: dict) -> None:
    """``value`` validates against ``schema`` (its $refs resolved in the document)."""
    OAS31Validator({**schema, "components": DOC["components"]}).validate(value)


def server_routes() -> set[tuple[str, str, str]]:
    """(method, path, operation) of every route ``osvmm up`` serves: the control
    server's own and those its services add (osvmm/up/daemon.py api_services)."""
    from osvmm.up.daemon import api_services
    from osvmm.up.server import ControlServer

    server = ControlServer("/nonexistent/s", None, on_down=lambda: None)
    sup = SimpleNamespace(partitions={}, on_build=[], on_ready=[], on_end=[])
    api_services(server, sup, None, lambda: None)
    return {(r.method, r.path, r.operation) for r in server.routes}


def test_the_document_is_valid_openapi():
    validate_spec(DOC)
    assert DOC["openapi"].startswith("3.1")


def test_every_route_served_is_documented_and_every_documented_route_is_served():
    documented = {(m, p, op_id) for op_id, (m, p, _) in operations().items()}
    served = server_routes()
    assert served - documented == set(), "served, not in docs/openapi.yaml"
    assert documented - served == set(), "in docs/openapi.yaml, not served"


def test_every_operation_documents_its_errors_and_path_parameters():
    for op_id, (_, path, op) in operations().items():
        assert "default" in op["responses"], op_id
        item = DOC["paths"][path]
        names = {resolve(p)["name"] for p in item.get("parameters", []) + op.get("parameters", [])}
        for part in Path(path).parts:
            if part.startswith("{"):
                assert part[1:-1] in names, (op_id, part)


# -- a real osvmm up ---------------------------------------------------------------------------

COUNTER = """
[[partition]]
name = "counter"
cpus = "floating"
memory = "8M"
image = "guests:counter"
cmdline = "every=0x1000000"
"""
PLAN = (
    COUNTER
    + """
[[partition]]
name = "hello"
cpus = "floating"
memory = "4M"
image = "guests:hello"

[[partition]]
name = "ping"
cpus = "floating"
memory = "16M"
image = "guests:ping"
cmdline = "peer=3 chan=0 rounds=20"
doorbells = ["pong"]

[[partition]]
name = "pong"
cpus = "floating"
memory = "16M"
image = "guests:pong"
cmdline = "peer=2 chan=0"
doorbells = ["ping"]

[[channel]]
name = "link"
size = "64K"
members = { ping = "rw", pong = "rw" }
"""
)


class Checker:
    """Sends requests with http.client and checks each answer against the document."""

    def __init__(self, sock: str):
        self.sock = sock
        self.ops = operations()
        self.seen: dict[str, set[int]] = {op_id: set() for op_id in self.ops}

    def target(self, op_id: str, name: str | None = None) -> str:
        path = self.ops[op_id][1]
        return path.replace("{name}", name) if name is not None else path

    def __call__(self, op_id: str, name=None, body=None, query="", status=200, headers=None):
        method, _, op = self.ops[op_id]
        if body is not None and status < 300:  # what we send is what the document allows
            content = resolve(op["requestBody"])["content"]["application/json"]
            schema_check(body, content["schema"])
        target = self.target(op_id, name) + query
        if headers:  # an upgrade: http.client reads the 101's head only
            conn = UnixHTTPConnection(self.sock)
            try:
                conn.request(method, target, headers=headers)
                r = conn.getresponse()
                got, got_headers = r.status, dict(r.getheaders())
                value = json.loads(r.read()) if got != 101 else None
            finally:
                conn.close()
        else:
            got, got_headers, value = api(self.sock, method, target, body)
        assert got == status, (op_id, target, got, value)
        self.check(op_id, got, got_headers, value)
        return value

    def check(self, op_id: str, status: int, headers: dict, value) -> None:
        _, _, op = self.ops[op_id]
        responses = op["responses"]
        if str(status) not in responses:
            assert status in GENERIC, (op_id, status, "not documented")
        response = resolve(responses.get(str(status), responses["default"]))
        self.seen[op_id].add(status)
        if status == 101:
            for name, header in response.get("headers", {}).items():
                assert name in headers, (op_id, name)
                schema_check(headers[name], header["schema"])
            return
        ctype = headers["Content-Type"].split(";")[0]
        assert ctype in response["content"], (op_id, status, ctype)
        schema_check(value, response["content"][ctype]["schema"])
        if status >= 400:
            assert "\n" not in value["error"], value


def incoming_up():
    from tests.test_supervisor_up import UpProcess

    class IncomingUp(UpProcess):
        """``osvmm up PLAN --incoming unix:DIR/in.sock``: it starts nothing, waits."""

        def _popen(self, argv, env):
            return super()._popen([*argv, "--incoming", f"unix:{self.dir}/in.sock"], env)

    return IncomingUp


def take_over_here(path: str, tmp_path: Path) -> dict:
    """Take the partitions of the VMM on ``path`` over into a supervisor of this
    process (as ``osvmm up --takeover`` does), then stop them; the old VMM's answer."""
    from osvmm.plan.config import parse_plan
    from osvmm.plan.placement import place
    from osvmm.plan.topology import read_topology
    from osvmm.up.hypercalls import serve_supervisor
    from osvmm.up.migrate import take_over
    from osvmm.up.supervisor import Supervisor

    plan = parse_plan(f'[vmm]\ncontrol_socket = "{path}"\n' + PLAN, tmp_path)
    sup = Supervisor(place(plan, read_topology()), log_dir=str(tmp_path / "new-logs"))
    live = serve_supervisor(sup)
    try:
        return take_over(path, sup)
    finally:
        sup.close()
        live.close()


@pytest.mark.kvm
def test_every_route_answers_as_the_document_says(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from tests.test_supervisor_up import UpProcess

    IncomingUp = incoming_up()  # noqa: N806 - a class
    up = UpProcess(PLAN)
    vmms = [up]
    check = Checker(up.sock)
    try:
        up.wait_for(
            lambda p: (
                p["counter"]["state"] == "running"
                and p["hello"]["state"] == "stopped"
                and p["ping"]["state"] == "stopped"
            ),
            timeout=60,
        )
        vmm = check("getVmm")
        assert [p["name"] for p in vmm["partitions"]] == ["counter", "hello", "ping", "pong"]
        assert check("listPartitions")["partitions"][0]["name"] == "counter"
        assert check("getPartition", "counter")["state"] == "running"
        stats = check("getStat")["partitions"]
        assert stats[2]["hypercalls"]["CHANNEL_ATTACH"]["0"] >= 1  # ping's
        assert check("getPartitionStat", "counter")["live"] is True
        # the lifecycle, and its errors
        assert check("startPartition", "counter", status=409)["error"].endswith("running")
        assert check("stopPartition", "hello", status=409)["error"].startswith("partition ")
        assert check("startPartition", "hello")["name"] == "hello"
        assert check("restartPartition", "counter")["state"] == "running"
        assert check("stopPartition", "counter", body={})["state"] == "stopped"
        assert check("startPartition", "counter")["state"] == "running"
        # write protection and violations
        assert check("getProtection", "counter")["rules"] is None
        got = check("protectPartition", "counter", {"ranges": ["0x400000+4"], "policy": "log"})
        assert got["rules"]["protected"] == [["0x400000", "0x400004"]]
        assert check("protectPartition", "counter", {"arm": True})["monitor"]["armed"] is True
        check("protectPartition", "ping", {"arm": True}, status=409)
        check("protectPartition", "counter", {"policy": "none"}, status=400)
        assert check("getViolations", "counter", query="?last=5")["violations"] == []
        check("getViolations", "counter", query="?last=x", status=400)
        # snapshots, migration, handover (their failures: no destination here)
        snap = check("snapshotPartition", "counter", {"dir": str(tmp_path / "snap")})
        assert snap["state"] == "running" and snap["memory"] == 8 << 20
        check("snapshotPartition", "ping", {"dir": str(tmp_path / "s2")}, status=409)
        check("snapshotPartition", "counter", {"dir": "relative"}, status=400)
        check("migratePartition", "counter", {"to": f"unix:{tmp_path}/none.sock"}, status=500)
        check("migratePartition", "counter", {"to": "nowhere"}, status=400)
        check("handover", body={"to": "tcp:127.0.0.1:1"}, status=400)
        # partitions created and destroyed at run time
        extra = '[[partition]]\nname = "extra"\ncpus = "floating"\nmemory = "4M"\n'
        extra += 'image = "guests:hello"\n'
        extra += (
            '[[channel]]\nname = "side"\nsize = "4K"\nmembers = { extra = "rw", ping = "ro" }\n'
        )
        made = check("createPartitions", body={"plan": extra, "start": False})
        assert [p["name"] for p in made["partitions"]] == ["extra"]
        assert made["channels"] == [
            {"name": "side", "id": 1, "size": 4096, "members": {"extra": "rw", "ping": "ro"}}
        ]
        check("createPartitions", body={"plan": extra}, status=409)
        check("createPartitions", body={"plan": "[[partition]]\nname = 1\n"}, status=400)
        assert check("destroyPartition", "extra") == {
            "name": "extra",
            "cpus": "",
            "memory": 4 << 20,
            "channels": ["side"],
        }
        # the console: an upgrade
        upgrade = {"Connection": "Upgrade", "Upgrade": "tcp"}
        check("attachConsole", "counter", status=101, headers=upgrade)
        check("attachConsole", "counter", status=400)
        # metrics: text a Prometheus parser reads
        conn = UnixHTTPConnection(up.sock)
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        check.check("getMetrics", r.status, dict(r.getheaders()), text)
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"osvmm_partition_state", "osvmm_hypercalls", "osvmm_snapshots"} <= names
        # every operation on a partition that does not exist, with a body it accepts
        bodies = {
            "snapshotPartition": {"dir": "/tmp/x"},
            "migratePartition": {"to": "unix:/tmp/x"},
        }
        for op_id, (_, path, _) in check.ops.items():
            if "{name}" in path:
                headers = upgrade if op_id == "attachConsole" else None
                kw = {"headers": headers} if headers else {"body": bodies.get(op_id)}
                check(op_id, "nosuch", status=404, **kw)
        # a field no operation knows, and another method
        for op_id, (method, path, op) in check.ops.items():
            if "requestBody" in op:
                check(op_id, "counter", body={"zz": 1}, status=400)
            other = "PUT"
            got, headers, value = api(up.sock, other, path.replace("{name}", "counter"))
            assert got == 405 and method in headers["Allow"].split(", "), (op_id, got)
            check.check(op_id, got, headers, value)
        # a migration that succeeds: to a second VMM, waiting with --incoming
        check("startPartition", "hello")
        dst = IncomingUp(COUNTER)
        vmms.append(dst)
        deadline = time.monotonic() + 30
        while not os.path.exists(f"{dst.dir}/in.sock"):
            assert time.monotonic() < deadline and dst.proc.poll() is None
            time.sleep(0.05)
        moved = check("migratePartition", "counter", {"to": f"unix:{dst.dir}/in.sock"})
        assert moved["state"] == "stopped" and moved["rounds"] >= 1
        assert dst.ps()["counter"]["state"] == "running"
        # a handover that succeeds: to a new VMM taking the partitions over (in this process)
        check("startPartition", "counter")
        reply = take_over_here(up.sock, tmp_path)
        check.check("handover", 200, {"Content-Type": "application/json"}, reply)
        assert reply["partitions"] == ["counter"]
        assert up.proc.wait(30) == 0  # the old VMM ended by itself
        check.sock = dst.sock
        assert check("down") == {}
        assert dst.proc.wait(30) == 0
    finally:
        for vmm in vmms:
            status, _, err = vmm.close()
            assert "Traceback" not in err and "internal error" not in err, err
    missing = [op_id for op_id, statuses in check.seen.items() if not statuses & {200, 101}]
    assert missing == [], "operations never answered with success"
    untested = [op_id for op_id, statuses in check.seen.items() if not statuses - {200, 101}]
    assert untested == [], "operations never answered with an error"


def test_an_upgrade_is_only_the_console():
    """The document's one 101 is the console's (a client may rely on it)."""
    with_101 = [op for op, (_, _, o) in operations().items() if "101" in o["responses"]]
    assert with_101 == ["attachConsole"]


@pytest.mark.kvm
def test_a_real_vmm_on_tcp_answers_with_the_token_only(tmp_path):
    """``osvmm up --listen HOST:PORT --token-file FILE``: the same API on TCP,
    every request with the token; the answers as the document says."""
    import http.client
    import socket

    from tests.test_supervisor_up import UpProcess

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = tmp_path / "token"
    token.write_text("f00dfeed" * 4 + "\n")
    token.chmod(0o600)

    class TcpUp(UpProcess):
        def _popen(self, argv, env):
            extra = ["--listen", f"127.0.0.1:{port}", "--token-file", str(token)]
            return super()._popen([*argv, *extra], env)

    up = TcpUp(COUNTER)
    check = Checker(up.sock)
    try:
        up.wait_for(lambda p: p["counter"]["state"] == "running")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for auth in (None, "Bearer " + "f00dfeed" * 4):
            conn.request("GET", "/v1/vmm", headers={"Authorization": auth} if auth else {})
            r = conn.getresponse()
            value = json.loads(r.read())
            assert r.status == (200 if auth else 401), value
            check.check("getVmm", r.status, dict(r.getheaders()), value)
        assert value["partitions"][0]["name"] == "counter"
        conn.close()
        log = (up.logs / "osvmm.log").read_text()
        assert f"the control API on TCP at 127.0.0.1:{port} (with the token)" in log
    finally:
        status, _, err = up.close()
    assert "Traceback" not in err, err
