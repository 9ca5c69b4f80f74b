"""Checked-in generated files match what the protos generate now: the client package's stubs."""

from __future__ import annotations

from pathlib import Path

from libs.codegen import CLIENT, generate_client_stubs


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
