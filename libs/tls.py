"""mTLS for every internal hop: server credentials that demand and verify a client certificate, and client
channels that present one; both pick up renewed certificate files without a restart.

The files are only read here, never written: whoever provisions identities (the launcher, the pool-manager for
its workers, a Kubernetes Secret) replaces them atomically (`libs.pki.write_private`). A key and a certificate
that do not belong together (a renewal caught between its two renames) are not taken; the previous pair stays
in use until the next look. Verification is never turned off.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from libs.settings import SettingsError, TlsSettings

log = logging.getLogger(__name__)

# How often a client channel looks at its files (a stat of three files, not a read).
CHECK_INTERVAL_SECONDS = 1.0
# A replaced client channel is closed once its last call ended and it has been idle this long.
RETIRE_AFTER_SECONDS = 5.0


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes
    ca: bytes
    not_after: dt.datetime


def _stamp(paths: Sequence[Path]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for path in paths:
        st = path.stat()
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _public(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def read_pem(settings: TlsSettings) -> Pem:
    """The identity's files, checked: the key is the certificate's, and the CA bundle parses."""
    try:
        cert, key, ca = settings.cert.read_bytes(), settings.key.read_bytes(), settings.ca.read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read the mesh identity: {exc}") from exc
    leaf = x509.load_pem_x509_certificate(cert)
    private = serialization.load_pem_private_key(key, password=None)
    if _public(private.public_key()) != _public(leaf.public_key()):
        raise ValueError(f"{settings.key} is not the key of {settings.cert}")
    if not x509.load_pem_x509_certificates(ca):
        raise ValueError(f"{settings.ca} holds no CA certificate")
    return Pem(cert, key, ca, leaf.not_valid_after_utc)


class IdentityFiles:
    """One identity's files, re-read only when they changed on disk. Thread-safe: gRPC's core asks for the
    server's certificates from its own threads."""

    def __init__(self, settings: TlsSettings):
        self.settings = settings
        self._paths = (settings.cert, settings.key, settings.ca)
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self.current = read_pem(settings)
        self._said_expired = False

    def refresh(self) -> Pem | None:
        """The new files when they changed since the last look and form a valid pair; else None."""
        with self._lock:
            try:
                stamp = _stamp(self._paths)
            except OSError as exc:
                log.warning("mesh identity files unreadable (%s); keeping the current certificate", exc)
                return None
            if stamp == self._stamp:
                self._warn_if_expired()
                return None
            try:
                fresh = read_pem(self.settings)
            except (ValueError, SettingsError) as exc:
                # Most likely a renewal between its renames: look again next time.
                log.warning("renewed mesh identity not taken yet: %s", exc)
                return None
            self._stamp, self.current, self._said_expired = stamp, fresh, False
            log.info("mesh identity %s renewed; valid until %s", self.settings.cert, fresh.not_after.isoformat())
            return fresh

    def _warn_if_expired(self) -> None:
        if not self._said_expired and self.current.not_after <= dt.datetime.now(dt.UTC):
            self._said_expired = True
            log.error(
                "our mesh certificate %s expired at %s and was not renewed: peers will refuse new connections",
                self.settings.cert,
                self.current.not_after.isoformat(),
            )


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials:
    """Credentials for one server port: callers must present a certificate chaining to the mesh CA bundle
    (plaintext, no certificate, another CA or an expired certificate fail the handshake). gRPC asks the
    fetcher at every handshake, so a renewed certificate serves the next connection; open ones stay."""
    files = IdentityFiles(settings)

    def configuration(pem: Pem) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)], root_certificates=pem.ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        fresh = files.refresh()
        return configuration(fresh) if fresh is not None else None

    return grpc.dynamic_ssl_server_credentials(configuration(files.current), fetch, require_client_authentication=True)


def channel_credentials(pem: Pem) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=pem.ca, private_key=pem.key, certificate_chain=pem.cert)


def target_name(target: str, settings: TlsSettings) -> str:
    """The name the server's certificate must carry. A list of addresses (`ipv4:a:1,b:2`) has no single host
    of its own, so the first one's stands for all (every replica's certificate names the same host)."""
    if settings.server_name:
        return settings.server_name
    if target.startswith(("ipv4:", "ipv6:")):
        first = target.split(":", 1)[1].split(",")[0]
        return first.rsplit(":", 1)[0].strip("[]")
    return ""


def secure_options(
    target: str, settings: TlsSettings, options: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    name = target_name(target, settings)
    return [*options, *([("grpc.ssl_target_name_override", name)] if name else [])]


def sync_channel(target: str, settings: TlsSettings, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking mTLS channel with the files as they are now (short-lived tools and tests)."""
    pem = read_pem(settings)
    return grpc.secure_channel(target, channel_credentials(pem), options=secure_options(target, settings, options))


class _Generation:
    """One underlying secure channel and the calls still open on it."""

    def __init__(self, number: int, channel: grpc.aio.Channel):
        self.number = number
        self.channel = channel
        self.open_calls = 0
        self.idle_since = time.monotonic()

    def track(self, call: Any) -> Any:
        self.open_calls += 1

        def done(_: Any) -> None:
            self.open_calls -= 1
            self.idle_since = time.monotonic()

        call.add_done_callback(done)
        return call


class _PerCallMultiCallable:
    """Hands each call to the renewing channel's current secure channel (stubs keep their multicallables, so
    the channel must be chosen per call, not when the stub was built)."""

    def __init__(self, owner: RenewingChannel, kind: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self._owner = owner
        self._kind = kind
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._generation = -1
        self._inner: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        gen = self._owner._live()
        if gen.number != self._generation:
            self._inner = getattr(gen.channel, self._kind)(self._method, *self._args, **self._kwargs)
            self._generation = gen.number
        return gen.track(self._inner(*args, **kwargs))


class RenewingChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A grpc.aio channel with a mesh identity whose certificate can be renewed while it is in use: when the
    files change, new calls go to a new secure channel (one new handshake); the old one serves its open calls
    (streams included) to their end and is closed once idle."""

    def __init__(
        self,
        target: str,
        settings: TlsSettings,
        *,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] | None = None,
        check_interval: float = CHECK_INTERVAL_SECONDS,
    ):
        self.target = target
        self._files = IdentityFiles(settings)
        self._options = secure_options(target, settings, options)
        self._interceptors = list(interceptors) if interceptors else None
        self._check_interval = check_interval
        self._next_check = time.monotonic() + check_interval
        self._current = _Generation(0, self._build(self._files.current))
        self._retired: list[_Generation] = []
        self._closers: set[asyncio.Task[None]] = set()

    def _build(self, pem: Pem) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            self.target, channel_credentials(pem), options=self._options, interceptors=self._interceptors
        )

    def _live(self) -> _Generation:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._check_interval
            fresh = self._files.refresh()
            if fresh is not None:
                self._retired.append(self._current)
                self._current = _Generation(self._current.number + 1, self._build(fresh))
            if self._retired:
                self._close_idle(now)
        return self._current

    def _close_idle(self, now: float) -> None:
        keep: list[_Generation] = []
        for gen in self._retired:
            if gen.open_calls <= 0 and now - gen.idle_since >= RETIRE_AFTER_SECONDS:
                task = asyncio.get_running_loop().create_task(gen.channel.close())
                self._closers.add(task)
                task.add_done_callback(self._closers.discard)
            else:
                keep.append(gen)
        self._retired = keep

    # grpc.aio.Channel ------------------------------------------------------------------------------

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _PerCallMultiCallable(self, "unary_unary", method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _PerCallMultiCallable(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _PerCallMultiCallable(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _PerCallMultiCallable(self, "stream_stream", method, args, kwargs)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._current.channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._current.channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._current.channel.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        for gen in [*self._retired, self._current]:
            await gen.channel.close(grace)
        self._retired = []

    async def __aenter__(self) -> RenewingChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
