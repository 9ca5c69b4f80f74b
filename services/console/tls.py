"""mTLS for the console's static-file service, as on every other internal port: the server presents its mesh
certificate, requires one from the caller, and serves only Envoy (and the launcher's health check). Renewed
certificate files are picked up at the next connection, without a restart."""

from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import Any

from libs.settings import TlsSettings

log = logging.getLogger(__name__)

# Who may fetch the console's files directly: Envoy (it serves them on the public port) and the launcher.
ALLOWED_CALLERS = frozenset({"spiffe://jobmesh/service/envoy", "spiffe://jobmesh/service/launcher"})


class ServerTls:
    def __init__(self, tls: TlsSettings):
        self.tls = tls
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] = ()
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        """The current server context, rebuilt when the certificate, key or CA file changed."""
        stamp = tuple(os.stat(p).st_mtime_ns for p in (self.tls.cert, self.tls.key, self.tls.ca))
        with self._lock:
            if self._context is None or stamp != self._stamp:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                context.load_cert_chain(self.tls.cert, self.tls.key)
                context.load_verify_locations(self.tls.ca)
                context.verify_mode = ssl.CERT_REQUIRED
                self._context, self._stamp = context, stamp
            return self._context


def caller_of(sock: ssl.SSLSocket) -> str | None:
    """The caller's SPIFFE id, from its verified certificate's single spiffe:// URI SAN."""
    cert = sock.getpeercert() or {}
    names: Any = cert.get("subjectAltName", ())
    uris = [v for k, v in names if k == "URI" and str(v).startswith("spiffe://")]
    return str(uris[0]) if len(uris) == 1 else None
