"""Unit tests for JWT issue and verification (libs/auth.py), with dev keys under a temporary directory."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from libs.auth import Principal, TokenVerifier, ensure_dev_keys, issue_token, key_paths, load_verification_keys
from libs.errors import Unauthenticated

ISSUER = "jobmesh-test"
AUDIENCE = "jobmesh"
TENANTS = {"acme", "globex", "initech"}


@dataclass(frozen=True)
class Keys:
    data_dir: Path
    private_pem: bytes
    public_pem: bytes
    stranger_pem: bytes  # a different RSA key: valid-looking tokens the mesh never issued


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    data_dir = tmp_path_factory.mktemp("auth")
    public = ensure_dev_keys(data_dir)
    private, _ = key_paths(data_dir)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Keys(
        data_dir=data_dir,
        private_pem=private.read_bytes(),
        public_pem=public.read_bytes(),
        stranger_pem=stranger.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


@pytest.fixture(scope="module")
def verifier(keys: Keys) -> TokenVerifier:
    public = key_paths(keys.data_dir)[1]
    return TokenVerifier(load_verification_keys(public), issuer=ISSUER, audience=AUDIENCE, tenants=TENANTS)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class TokenBuilder:
    """Claims the mesh would issue, then bent one way or another before signing."""

    def __init__(self, keys: Keys):
        now = int(time.time())
        self._keys = keys
        self._claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "dev-user@acme",
            "tenant": "acme",
            "roles": [],
            "iat": now,
            "exp": now + 3600,
        }
        self._signing = "rs256"

    def claims(self, **changes: Any) -> TokenBuilder:
        self._claims.update(changes)
        return self

    def without(self, claim: str) -> TokenBuilder:
        self._claims.pop(claim)
        return self

    def signed_by_a_stranger(self) -> TokenBuilder:
        self._signing = "stranger"
        return self

    def unsigned(self) -> TokenBuilder:
        self._signing = "none"
        return self

    def hs256_with_the_public_key(self) -> TokenBuilder:
        self._signing = "hs256-public"
        return self

    def build(self) -> str:
        if self._signing == "rs256":
            return jwt.encode(self._claims, self._keys.private_pem, algorithm="RS256")
        if self._signing == "stranger":
            return jwt.encode(self._claims, self._keys.stranger_pem, algorithm="RS256")
        if self._signing == "none":
            return jwt.encode(self._claims, None, algorithm="none")
        # By hand: PyJWT itself refuses to use a PEM public key as an HMAC secret.
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps(self._claims).encode())
        signature = hmac.new(self._keys.public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64(signature)}"


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_a_valid_token_yields_the_tenant_and_roles(keys: Keys, verifier: TokenVerifier) -> None:
    token = issue_token(keys.data_dir, tenant="globex", issuer=ISSUER, audience=AUDIENCE)

    principal = verifier.verify(bearer(token))

    assert principal == Principal(tenant_id="globex", subject="dev-user@globex", roles=frozenset())
    assert principal.is_admin is False


def test_an_admin_token_carries_the_admin_role(keys: Keys, verifier: TokenVerifier) -> None:
    token = issue_token(keys.data_dir, tenant="initech", issuer=ISSUER, audience=AUDIENCE, admin=True, subject="ops")

    principal = verifier.verify(bearer(token))

    assert principal.roles == frozenset({"admin"})
    assert principal.is_admin is True
    assert principal.subject == "ops"


def test_the_bearer_scheme_is_case_insensitive(keys: Keys, verifier: TokenVerifier) -> None:
    token = issue_token(keys.data_dir, tenant="acme", issuer=ISSUER, audience=AUDIENCE)

    assert verifier.verify(f"bearer {token}").tenant_id == "acme"


def test_a_repeated_token_is_answered_from_the_cache_with_the_same_principal(
    keys: Keys, verifier: TokenVerifier
) -> None:
    token = issue_token(keys.data_dir, tenant="acme", issuer=ISSUER, audience=AUDIENCE)

    first = verifier.verify(bearer(token))
    second = verifier.verify(bearer(token))

    assert first == second
    assert token in verifier._cache


BAD_HEADERS = [
    pytest.param(None, "TOKEN_MISSING", id="no-header"),
    pytest.param("", "TOKEN_MISSING", id="empty-header"),
    pytest.param("Basic dXNlcjpwYXNz", "TOKEN_MALFORMED", id="basic-scheme"),
    pytest.param("Bearer", "TOKEN_MALFORMED", id="bearer-without-token"),
    pytest.param("Token abc.def.ghi", "TOKEN_MALFORMED", id="other-scheme"),
    pytest.param("Bearer not-a-jwt", "TOKEN_INVALID", id="garbage-token"),
]


@pytest.mark.parametrize(("header", "reason"), BAD_HEADERS)
def test_a_bad_authorization_header_is_unauthenticated(
    verifier: TokenVerifier, header: str | None, reason: str
) -> None:
    with pytest.raises(Unauthenticated) as refused:
        verifier.verify(header)

    assert refused.value.reason == reason


BAD_TOKENS = [
    pytest.param(lambda b: b.signed_by_a_stranger(), "TOKEN_INVALID", "signature", id="signed-with-another-rsa-key"),
    pytest.param(lambda b: b.unsigned(), "TOKEN_INVALID", "alg", id="alg-none"),
    pytest.param(lambda b: b.hs256_with_the_public_key(), "TOKEN_INVALID", "alg", id="hs256-with-public-key-as-secret"),
    pytest.param(lambda b: b.claims(exp=int(time.time()) - 60), "TOKEN_EXPIRED", "expired", id="expired"),
    pytest.param(
        lambda b: b.claims(exp=int(time.time()) - 60).signed_by_a_stranger(),
        "TOKEN_INVALID",
        "signature",
        id="expired-and-forged-is-invalid-not-expired",
    ),
    pytest.param(lambda b: b.without("exp"), "TOKEN_INVALID", "exp", id="no-expiry"),
    pytest.param(lambda b: b.claims(iss="someone-else"), "TOKEN_INVALID", "issuer", id="wrong-issuer"),
    pytest.param(lambda b: b.claims(aud="another-service"), "TOKEN_INVALID", "audience", id="wrong-audience"),
    pytest.param(lambda b: b.without("tenant"), "TOKEN_INVALID", "tenant", id="missing-tenant-claim"),
    pytest.param(lambda b: b.claims(tenant="umbrella"), "UNKNOWN_TENANT", "tenant", id="unknown-tenant"),
    pytest.param(lambda b: b.claims(tenant=["acme"]), "UNKNOWN_TENANT", "tenant", id="tenant-not-a-string"),
    pytest.param(lambda b: b.claims(roles="admin"), "TOKEN_INVALID", "roles", id="roles-not-a-list"),
]


@pytest.mark.parametrize(("bend", "reason", "why"), BAD_TOKENS)
def test_a_bad_token_is_unauthenticated(keys: Keys, verifier: TokenVerifier, bend: Any, reason: str, why: str) -> None:
    token = bend(TokenBuilder(keys)).build()

    with pytest.raises(Unauthenticated) as refused:
        verifier.verify(bearer(token))

    assert refused.value.reason == reason
    assert why in refused.value.message.lower()
    assert token not in verifier._cache


def test_the_untampered_builder_token_is_accepted(keys: Keys, verifier: TokenVerifier) -> None:
    # The control for the table above: the builder's defaults do verify, so each refusal is the bent claim's doing.
    assert verifier.verify(bearer(TokenBuilder(keys).build())).tenant_id == "acme"


def test_an_issued_token_with_a_negative_ttl_is_already_expired(keys: Keys, verifier: TokenVerifier) -> None:
    token = issue_token(keys.data_dir, tenant="acme", issuer=ISSUER, audience=AUDIENCE, ttl=-1)

    with pytest.raises(Unauthenticated) as refused:
        verifier.verify(bearer(token))

    assert refused.value.reason == "TOKEN_EXPIRED"


def test_ensure_dev_keys_keeps_an_existing_key_and_the_private_half_is_owner_only(keys: Keys) -> None:
    public = ensure_dev_keys(keys.data_dir)
    private, _ = key_paths(keys.data_dir)

    assert public.read_bytes() == keys.public_pem
    assert private.read_bytes() == keys.private_pem
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_issue_token_without_a_key_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no signing key"):
        issue_token(tmp_path, tenant="acme", issuer=ISSUER, audience=AUDIENCE)


def test_a_verifier_needs_at_least_one_key() -> None:
    with pytest.raises(ValueError, match="no verification keys"):
        TokenVerifier([], issuer=ISSUER, audience=AUDIENCE, tenants=TENANTS)
