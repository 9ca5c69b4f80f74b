"""Bad tokens get 401 and nothing else; bad specs get 400 naming the field; tenants never see each other."""

from __future__ import annotations

import base64
import json
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from devtools.launcher import Stack
from tests.helpers import Api, job_spec, token


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": "jobmesh-test",
        "aud": "jobmesh",
        "sub": "mallory",
        "tenant": "acme",
        "roles": ["admin"],
        "iat": now,
        "exp": now + 600,
    }
    claims.update(over)
    return claims


def _foreign_key_token() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return jwt.encode(_claims(), pem, algorithm="RS256")


def _assert_clean_error(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    text = resp.text
    assert "Traceback" not in text and 'File "' not in text
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(None, id="no token"),
        pytest.param("Bearer", id="empty bearer"),
        pytest.param("Basic dXNlcjpwdw==", id="wrong scheme"),
        pytest.param("Bearer not.a.jwt", id="malformed"),
        pytest.param(f"Bearer {_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}.", id="alg none"),
        pytest.param("Bearer " + _foreign_key_token(), id="bad signature"),
    ],
)
def test_bad_tokens_are_refused_with_401(stack: Stack, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        for method, path in (("POST", "/api/v1/jobs"), ("GET", "/api/v1/jobs"), ("GET", "/api/v1/pools")):
            resp = client.request(method, path, headers=headers, json=job_spec() if method == "POST" else None)
            body = _assert_clean_error(resp, 401)
            assert body["details"][0]["reason"].startswith(("TOKEN_", "UNKNOWN_TENANT")), body


def test_an_expired_token_is_refused(stack: Stack) -> None:
    api = Api(stack.url, token(stack, ttl=-30))
    body = _assert_clean_error(api.call("GET", "/api/v1/jobs"), 401)
    assert body["details"][0]["reason"] == "TOKEN_EXPIRED"


def test_an_unknown_tenant_is_refused(stack: Stack) -> None:
    from libs.auth import key_paths

    private = key_paths(stack.data_dir)[0].read_bytes()
    forged = jwt.encode(_claims(tenant="hooli"), private, algorithm="RS256")
    body = _assert_clean_error(Api(stack.url, forged).call("GET", "/api/v1/jobs"), 401)
    assert body["details"][0]["reason"] == "UNKNOWN_TENANT"


def test_a_refused_submit_stores_nothing(stack: Stack, acme: Api) -> None:
    before = len(acme.call("GET", "/api/v1/jobs", params={"page_size": 500}).json()["jobs"])
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        assert client.post("/api/v1/jobs", json=job_spec("sneaky")).status_code == 401
    after = acme.call("GET", "/api/v1/jobs", params={"page_size": 500}).json()["jobs"]
    assert len(after) == before
    assert "sneaky" not in {j["spec"]["name"] for j in after}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        pytest.param({"command": ["true"], "resources": {"cpu_millis": 1, "memory_mb": 1}}, "name", id="no name"),
        pytest.param({"name": "x", "resources": {"cpu_millis": 1, "memory_mb": 1}}, "command", id="no command"),
        pytest.param({"name": "x", "command": ["true"]}, "resources", id="no resources"),
        pytest.param(job_spec(resources={"cpu_millis": 0, "memory_mb": 64}), "resources.cpu_millis", id="zero cpu"),
        pytest.param(
            job_spec(resources={"cpu_millis": 100, "memory_mb": -5}), "resources.memory_mb", id="negative memory"
        ),
        pytest.param(job_spec(pool="atlantis"), "pool", id="unknown pool"),
        pytest.param(job_spec(command=["echo", "x" * 200_000]), "spec", id="huge command"),
        pytest.param(job_spec(resources={"cpu_millis": 64_000, "memory_mb": 64}), "resources", id="fits no worker"),
        pytest.param(job_spec(max_retries=99), "max_retries", id="too many retries"),
    ],
)
def test_an_invalid_spec_is_a_400_naming_the_field(acme: Api, spec: dict[str, object], field: str) -> None:
    body = _assert_clean_error(acme.call("POST", "/api/v1/jobs", json=spec), 400)
    info = body["details"][0]
    assert info["metadata"]["field"] == field, body
    assert field in body["message"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        pytest.param("/api/v1/jobs", {**job_spec("typo"), "max_runtime_second": 5}, "max_runtime_second", id="typo"),
        pytest.param(
            "/api/v1/jobs",
            job_spec("nested", resources={"cpu_millis": 100, "memory_mb": 64, "gpus": 1}),
            "resources.gpus",
            id="nested",
        ),
        pytest.param("/api/v1/jobs", {**job_spec("escaped"), "pri\\u006fr": 1}, "prior", id="escaped key"),
        pytest.param(
            "/api/v1/tenants/acme/burst", {"cpu_millis": 1, "duration_minutes": 5}, "duration_minutes", id="burst"
        ),
    ],
)
def test_an_unknown_body_field_is_a_400_naming_it_and_creates_nothing(
    acme: Api, path: str, body: dict[str, object], field: str
) -> None:
    """Transcoding would drop the key and run the job as if it had not been sent (no runtime limit here)."""
    raw = json.dumps(body).replace("\\\\", "\\")  # the escaped-key case sends a JSON escape in the key itself
    resp = acme.call("POST", path, content=raw.encode(), headers={"content-type": "application/json"})
    error = _assert_clean_error(resp, 400)
    assert error["details"][0]["reason"] == "UNKNOWN_FIELD", error
    assert error["details"][0]["metadata"]["field"] == field
    assert field in error["message"]
    names = {j["spec"]["name"] for j in acme.call("GET", "/api/v1/jobs", params={"page_size": 500}).json()["jobs"]}
    assert not names & {"typo", "nested", "escaped"}


def test_known_fields_in_either_json_spelling_and_free_form_maps_pass_the_check(acme: Api) -> None:
    spec = {**job_spec("camel", ["true"]), "maxRuntimeSeconds": 30, "env": {"ANY_NAME": "1", "other": "2"}}
    job = acme.submit(spec)
    assert job["spec"]["max_runtime_seconds"] == 30
    assert job["spec"]["env"] == {"ANY_NAME": "1", "other": "2"}


def test_a_spec_over_the_total_size_limit_is_spec_too_large_and_creates_nothing(acme: Api) -> None:
    # argv and env each within their own bounds, together over the 64 KiB spec limit.
    spec = job_spec("too-big", command=["echo", "x" * 40_000], env={"BIG": "y" * 40_000})
    body = _assert_clean_error(acme.call("POST", "/api/v1/jobs", json=spec), 400)
    assert body["details"][0]["reason"] == "SPEC_TOO_LARGE"
    assert "65536 bytes" in body["message"]
    names = {j["spec"]["name"] for j in acme.call("GET", "/api/v1/jobs", params={"page_size": 500}).json()["jobs"]}
    assert "too-big" not in names


def test_a_body_over_the_size_limit_is_refused(acme: Api) -> None:
    resp = acme.call("POST", "/api/v1/jobs", json=job_spec(command=["echo", "x" * 2_000_000]))
    assert resp.status_code == 413


def test_a_page_size_above_the_maximum_is_coerced_and_a_negative_one_refused(acme: Api) -> None:
    resp = acme.call("GET", "/api/v1/jobs", params={"page_size": 1000})
    assert resp.status_code == 200, resp.text
    assert len(resp.json().get("jobs", [])) <= 500
    body = _assert_clean_error(acme.call("GET", "/api/v1/jobs", params={"page_size": -1}), 400)
    assert body["details"][0]["metadata"]["field"] == "page_size"


def test_jobs_list_newest_first_on_request_and_a_bad_order_is_400(acme: Api) -> None:
    ids = [acme.submit(job_spec(f"order-{i}", ["true"]))["job_id"] for i in range(3)]
    newest = acme.call("GET", "/api/v1/jobs", params={"order_by": "create_time desc", "page_size": 3})
    assert newest.status_code == 200, newest.text
    assert [j["job_id"] for j in newest.json()["jobs"]] == ids[::-1]
    body = _assert_clean_error(acme.call("GET", "/api/v1/jobs", params={"order_by": "name"}), 400)
    assert body["details"][0]["metadata"]["field"] == "order_by"


def test_malformed_json_and_unknown_query_parameters_are_400(acme: Api) -> None:
    resp = acme.call("POST", "/api/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    _assert_clean_error(resp, 400)
    _assert_clean_error(acme.call("GET", "/api/v1/jobs", params={"colour": "blue"}), 400)


def test_another_tenants_job_is_not_found_and_cannot_be_cancelled(acme: Api, globex: Api, admin: Api) -> None:
    job = acme.submit(job_spec("private", ["sleep", "1"]))
    assert globex.call("GET", f"/api/v1/jobs/{job['job_id']}").status_code == 404
    assert globex.cancel(job["job_id"]).status_code == 404
    assert acme.get(job["job_id"])["state"] in {"JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"}
    # An admin may look across tenants.
    assert admin.get(job["job_id"])["tenant_id"] == "acme"


@pytest.mark.parametrize("job_id", ["does-not-exist", "..%2F..%2Fquota", "a" * 300])
def test_unknown_or_hostile_job_ids_are_404(acme: Api, job_id: str) -> None:
    resp = acme.call("GET", f"/api/v1/jobs/{job_id}")
    assert resp.status_code in (400, 404)


def test_quota_endpoints_are_the_tenants_own_or_admin(acme: Api, globex: Api, admin: Api) -> None:
    mine = acme.call("GET", "/api/v1/tenants/acme/quotas")
    assert mine.status_code == 200, mine.text
    assert set(mine.json()["limits"]) == {"cpu_millis", "memory_mb", "concurrent_jobs"}
    assert globex.call("GET", "/api/v1/tenants/acme/quotas").status_code == 403
    assert acme.call("PUT", "/api/v1/tenants/acme/quotas", json={"limits": {"concurrent_jobs": 5}}).status_code == 403
    assert admin.call("GET", "/api/v1/tenants/acme/quotas").status_code == 200
    assert admin.call("GET", "/api/v1/tenants/hooli/quotas").status_code == 404
    bad = admin.call("PUT", "/api/v1/tenants/acme/quotas", json={"limits": {"concurrent_jobs": 0}})
    assert bad.status_code == 400


def test_a_submit_over_quota_is_429_with_the_limit_and_usage(globex: Api, admin: Api) -> None:
    resp = admin.call("PUT", "/api/v1/tenants/globex/quotas", json={"limits": {"concurrent_jobs": 1}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["limits"]["concurrent_jobs"] == 1
    assert resp.json()["limits"]["cpu_millis"] == 64000  # fields left out keep their value
    try:
        first = globex.submit(job_spec("holds-the-slot", ["sleep", "3"]))
        refused = globex.call("POST", "/api/v1/jobs", json=job_spec("one-too-many"))
        body = _assert_clean_error(refused, 429)
        info = body["details"][0]
        assert info["reason"] == "QUOTA_EXCEEDED"
        assert info["metadata"]["limit"] == "concurrent_jobs"
        assert info["metadata"]["usage"] == "1"
        assert int(refused.headers["retry-after"]) >= 1  # the gateway's retry hint, passed on by Envoy
        quota = globex.call("GET", "/api/v1/tenants/globex/quotas").json()
        assert quota["usage"]["concurrent_jobs"] == 1
        # Usage is released when the job ends, and the next submit fits again.
        globex.wait_terminal(first["job_id"])
        deadline = time.monotonic() + 10
        while globex.call("GET", "/api/v1/tenants/globex/quotas").json()["usage"]["concurrent_jobs"] != 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        globex.submit(job_spec("fits-again", ["true"]))
    finally:
        admin.call("PUT", "/api/v1/tenants/globex/quotas", json={"limits": {"concurrent_jobs": 2000}})
