"""The console's HTTP server: a stdlib threading server on loopback that answers from ConsoleAssets."""

from __future__ import annotations

import logging
import socket
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from services.console.assets import ConsoleAssets
from services.console.tls import ALLOWED_CALLERS, ServerTls, caller_of

log = logging.getLogger(__name__)

# A request line or header block larger than this is refused by http.server itself (431/414).
REQUEST_TIMEOUT_SECONDS = 10


class ConsoleServer(ThreadingHTTPServer):
    daemon_threads = True
    # Envoy is the only client; a backlog this size is plenty and bounds what waits.
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], assets: ConsoleAssets, tls: ServerTls):
        self.assets = assets
        self.tls = tls
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], _Refused):  # logged already; close it without an answer
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        super().handle_error(request, client_address)

    def get_request(self) -> tuple[Any, Any]:
        # Wrapped here, shaken hands in the request's own thread (setup), so a slow client holds no other.
        sock, address = super().get_request()
        return self.tls.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address


class _Handler(BaseHTTPRequestHandler):
    server: ConsoleServer
    protocol_version = "HTTP/1.1"
    server_version = "jobmesh-console"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_SECONDS

    def setup(self) -> None:
        conn = self.request
        conn.settimeout(REQUEST_TIMEOUT_SECONDS)
        try:
            conn.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.warning("refused a connection from %s: %s", self.client_address[0], exc)
            raise _Refused from exc
        caller = caller_of(conn)
        if caller not in ALLOWED_CALLERS:
            log.warning("refused caller=%s (not allowed to fetch the console's files)", caller or "none")
            raise _Refused
        super().setup()

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


class _Refused(Exception):
    """A connection without an allowed mesh identity: closed without an answer."""
