"""Checked-in generated files match what the protos generate now: the client package's stubs and the OpenAPI
document (which must also be valid OpenAPI 3)."""

from __future__ import annotations

from pathlib import Path

import yaml
from openapi_spec_validator import validate

from libs.codegen import CLIENT, generate_client_stubs
from libs.openapi import DESCRIPTORS, DOCUMENT, render


def test_the_client_packages_stubs_match_the_protos(tmp_path: Path) -> None:
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in generate_client_stubs(tmp_path)}
    committed = {
        p.relative_to(CLIENT / "jobmesh"): p.read_bytes()
        for d in ("common", "gateway")
        for p in (CLIENT / "jobmesh" / d).rglob("*")
        if p.is_file() and p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    stale = sorted(str(name) for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not stale, f"run `make client-stubs`: {stale}"


def test_the_openapi_document_matches_the_protos_and_is_valid_openapi_3() -> None:
    committed = DOCUMENT.read_text()
    assert committed == render(DESCRIPTORS.read_bytes()), "docs/openapi.yaml is stale: run `make openapi`"
    document = yaml.safe_load(committed)
    validate(document)  # openapi-spec-validator: raises on an invalid document
    operations = {(verb, path) for path, ops in document["paths"].items() for verb in ops}
    assert ("get", "/api/v1/jobs/{job_id}/logs") in operations
    assert ("post", "/api/v1/jobs:dryRun") in operations
    assert ("get", "/api/v1/jobs/{job_id}:watch") in operations
    submit = document["paths"]["/api/v1/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("JobSpec")
    spec = document["components"]["schemas"]["jobmesh.common.v1.JobSpec"]["properties"]
    assert spec["command"]["description"] == "argv; the first element is the program."  # proto comments
