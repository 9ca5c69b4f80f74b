"""The console's HTTP server: a stdlib threading server on loopback that answers from ConsoleAssets."""

from __future__ import annotations

import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from services.console.assets import ConsoleAssets

log = logging.getLogger(__name__)

# A request line or header block larger than this is refused by http.server itself (431/414).
REQUEST_TIMEOUT_SECONDS = 10


class ConsoleServer(ThreadingHTTPServer):
    daemon_threads = True
    # Envoy is the only client; a backlog this size is plenty and bounds what waits.
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], assets: ConsoleAssets):
        self.assets = assets
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: ConsoleServer
    protocol_version = "HTTP/1.1"
    server_version = "jobmesh-console"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_SECONDS

    def _serve(self) -> None:
        answer = self.server.assets.answer(self.command, self.path, self.headers.get("If-None-Match"))
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD" and answer.status != 304:
            self.wfile.write(answer.body)

    do_GET = _serve
    do_HEAD = _serve
    do_POST = _serve
    do_PUT = _serve
    do_DELETE = _serve
    do_PATCH = _serve
    do_OPTIONS = _serve

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: object) -> None:
        log.warning("%s %s", self.address_string(), format % args)
