"""``osvmm metrics``: the VMM's ``GET /metrics`` on stdout, or served read-only
over TCP for a Prometheus server (docs/operations.md).

Prometheus scrapes over TCP; the control socket is a Unix socket that can
stop partitions and type into consoles, and must not be put on the network.
``--listen HOST:PORT`` serves one path, ``GET /metrics``, by asking the
control socket for it on each scrape: nothing else of the API is reachable
through it, whoever connects. It is ``http.server`` here (a threaded server
answering one fixed, bodiless GET; every other request a 404 or 501), run in
the foreground (a service manager or a terminal keeps it).
"""

from __future__ import annotations

import sys

from osvmm.errors import ControlError, OsvmmError
from osvmm.stdio import say
from osvmm.up.protocol import get_raw, parse_host_port

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metrics(path, listen: str | None) -> int:
    if listen is None:
        sys.stdout.buffer.write(get_raw(path, "/metrics"))
        return 0
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    host, port = parse_host_port(listen, "--listen")

    class Handler(BaseHTTPRequestHandler):
        server_version = "osvmm-metrics"
        timeout = 30  # a client that sends nothing holds a thread this long at most

        def do_GET(self):  # noqa: N802 - the name http.server calls
            if self.path.split("?")[0] != "/metrics":
                self._send(404, b"only /metrics is served here\n", "text/plain")
                return
            try:
                body = get_raw(path, "/metrics", timeout=20)
            except OsvmmError as err:
                self._send(503, f"{err}\n".encode(), "text/plain")
                return
            self._send(200, body, CONTENT_TYPE)

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # noqa: A002 - http.server's signature
            pass  # a scrape every 15 s is not news

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise ControlError(f"--listen {listen}: {e.strerror or e}") from None
    server.daemon_threads = True
    say(f"osvmm: serving the metrics of {path} at http://{host}:{port}/metrics")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
