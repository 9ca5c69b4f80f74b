"""JWT issue and verification: RS256 only, exp/iss/aud required, the tenant claim the only source of tenancy."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from libs.errors import Unauthenticated

ALGORITHMS = ["RS256"]  # pinned: a token that names another algorithm (or none) is refused


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    subject: str
    roles: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


def key_paths(data_dir: Path) -> tuple[Path, Path]:
    keys = data_dir / "keys"
    return keys / "jwt-private.pem", keys / "jwt-public.pem"


def ensure_dev_keys(data_dir: Path) -> Path:
    """Creates the dev stack's signing key on first run; returns the public key path."""
    private, public = key_paths(data_dir)
    if private.exists() and public.exists():
        return public
    private.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return public


def issue_token(
    data_dir: Path,
    *,
    tenant: str,
    issuer: str,
    audience: str,
    admin: bool = False,
    ttl: int = 3600,
    subject: str | None = None,
) -> str:
    private, _ = key_paths(data_dir)
    if not private.exists():
        raise FileNotFoundError(f"no signing key in {private.parent}; run `make run` once (or `jobmesh keys`)")
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": subject or f"dev-user@{tenant}",
        "tenant": tenant,
        "roles": ["admin"] if admin else [],
        "iat": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, private.read_bytes(), algorithm="RS256")


def load_verification_keys(path: Path) -> list[Any]:
    """A PEM public key, or a JWKS file (every RSA key in it)."""
    raw = path.read_bytes()
    if raw.lstrip().startswith(b"{"):
        jwks = json.loads(raw)
        return [jwt.PyJWK(k).key for k in jwks.get("keys", []) if k.get("kty") == "RSA"]
    return [serialization.load_pem_public_key(raw)]


def jwks_document(keys_file: Path) -> str:
    """The JWKS (RS256 keys) for the keys in `keys_file` (a PEM public key or a JWKS): what Envoy's jwt_authn reads,
    so that the edge and the gateway verify with the same keys. Rotation: put the new key beside the old one in
    the file, re-render (restart Envoy, roll its pods), start signing with the new key, later drop the old one."""
    jwks = []
    for key in load_verification_keys(keys_file):
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError(f"{keys_file}: only RSA public keys are accepted (RS256)")
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
        jwks.append({**jwk, "alg": "RS256", "use": "sig"})
    if not jwks:
        raise ValueError(f"{keys_file}: no RSA public key")
    return json.dumps({"keys": jwks}, indent=2) + "\n"


class TokenVerifier:
    """Verifies bearer tokens; caches verified ones briefly so repeated calls skip the RSA check."""

    def __init__(self, keys: list[Any], *, issuer: str, audience: str, tenants: set[str], cache_size: int = 4096):
        if not keys:
            raise ValueError("no verification keys")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.tenants = tenants
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._cache_size = cache_size

    def verify(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("missing bearer token", reason="TOKEN_MISSING")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization must be 'Bearer <token>'", reason="TOKEN_MALFORMED")
        token = token.strip()
        cached = self._cache.get(token)
        if cached is not None:
            principal, exp = cached
            if time.time() < exp:
                return principal
            self._cache.pop(token, None)
        principal, exp = self._decode(token)
        self._cache[token] = (principal, exp)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal

    def _decode(self, token: str) -> tuple[Principal, float]:
        claims: dict[str, object] | None = None
        last_error: Exception | None = None
        for key in self.keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=ALGORITHMS,
                    audience=self.audience,
                    issuer=self.issuer,  # type: ignore[arg-type]
                    options={"require": ["exp", "iss", "aud", "tenant"]},
                )
                break
            except jwt.ExpiredSignatureError as exc:
                raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from exc
            except jwt.InvalidTokenError as exc:
                last_error = exc
        if claims is None:
            raise Unauthenticated(f"invalid token: {last_error}", reason="TOKEN_INVALID")
        tenant = claims.get("tenant")
        if not isinstance(tenant, str) or tenant not in self.tenants:
            raise Unauthenticated("unknown tenant", reason="UNKNOWN_TENANT")
        roles = claims.get("roles", [])
        if not isinstance(roles, list):
            raise Unauthenticated("roles claim must be a list", reason="TOKEN_INVALID")
        principal = Principal(tenant, str(claims.get("sub", "")), frozenset(str(r) for r in roles))
        return principal, float(claims["exp"])  # type: ignore[arg-type]
