"""The daemon's HTTP endpoint on ``--metrics-port``: ``GET /metrics`` (Prometheus text, from
``prometheus_client``) and ``GET /healthz`` (200 or 503 with a small JSON body).

It runs on threads of its own (a threading WSGI server), not on the event loop: a scrape never
delays a client's reply, and ``/healthz`` still answers, 503, when the loop is stalled.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app

from ckptd.daemon.health import Health
from ckptd.daemon.metrics import Metrics

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s", format % args)


def app(metrics: Metrics, health: Health) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    prometheus = make_wsgi_app(metrics.registry)

    def serve(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return prometheus(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            healthy, report = health.report()
            body = json.dumps(report).encode() + b"\n"
            start_response(
                "200 OK" if healthy else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        body = b"not found; metrics are at /metrics, health at /healthz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return serve


class HttpEndpoint:
    """``/metrics`` and ``/healthz`` served on a thread until ``close``."""

    def __init__(self, metrics: Metrics, health: Health, host: str, port: int) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("_Server", (_Server,), {"address_family": family})
        self._server: WSGIServer = server_class((host, port), _Quiet)
        self._server.set_app(app(metrics, health))
        self._thread = threading.Thread(target=self._server.serve_forever, name="ckptd-http", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%s/metrics, health on /healthz", host, self.port)

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
