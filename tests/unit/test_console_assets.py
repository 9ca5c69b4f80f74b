"""The console's static files: what each path answers, with which headers; nothing outside the build leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.console.assets import CONTENT_SECURITY_POLICY, IMMUTABLE, REVALIDATE, ConsoleAssets


@pytest.fixture()
def built(tmp_path: Path) -> ConsoleAssets:
    root = tmp_path / "dist"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>console</title>")
    (root / "assets" / "index-abc123.js").write_text("console.log(1)")
    (root / "assets" / "index-abc123.css").write_text("body{}")
    (root / "favicon.svg").write_text("<svg/>")
    (root / ".hidden").write_text("secret")
    (tmp_path / "outside.txt").write_text("outside")
    return ConsoleAssets(root)


@pytest.mark.parametrize(
    ("path", "status", "content_type", "cache"),
    [
        pytest.param("/console/", 200, "text/html; charset=utf-8", REVALIDATE, id="index"),
        pytest.param("/console/?x=1", 200, "text/html; charset=utf-8", REVALIDATE, id="index with a query"),
        pytest.param("/console/assets/index-abc123.js", 200, "text/javascript; charset=utf-8", IMMUTABLE, id="script"),
        pytest.param("/console/assets/index-abc123.css", 200, "text/css; charset=utf-8", IMMUTABLE, id="style"),
        pytest.param("/console/favicon.svg", 200, "image/svg+xml", REVALIDATE, id="icon"),
    ],
)
def test_built_files_are_served_with_their_type_and_cache_rule(
    built: ConsoleAssets, path: str, status: int, content_type: str, cache: str
) -> None:
    answer = built.answer("GET", path)
    assert answer.status == status
    assert answer.header("Content-Type") == content_type
    assert answer.header("Cache-Control") == cache
    assert answer.header("Content-Security-Policy") == CONTENT_SECURITY_POLICY
    assert answer.header("X-Content-Type-Options") == "nosniff"
    assert answer.body


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/console/../outside.txt", id="dot-dot"),
        pytest.param("/console/%2e%2e/outside.txt", id="encoded dot-dot"),
        pytest.param("/console/assets/..%2f..%2foutside.txt", id="encoded slashes"),
        pytest.param("/console/assets/%00.js", id="nul byte"),
        pytest.param("/console/..\\outside.txt", id="backslash"),
        pytest.param("/console/.hidden", id="hidden file"),
        pytest.param("/console/assets/", id="directory: no listing"),
        pytest.param("/console/assets", id="directory without a slash"),
        pytest.param("/console/nope.js", id="missing file"),
        pytest.param("/etc/passwd", id="outside the prefix"),
        pytest.param("/api/v1/jobs", id="the API is not ours"),
    ],
)
def test_nothing_outside_the_build_or_hidden_is_served(built: ConsoleAssets, path: str) -> None:
    answer = built.answer("GET", path)
    assert answer.status == 404
    assert b"secret" not in answer.body and b"outside" not in answer.body


def test_only_get_and_head_are_answered(built: ConsoleAssets) -> None:
    assert built.answer("POST", "/console/").status == 405
    assert built.answer("POST", "/console/").header("Allow") == "GET, HEAD"
    assert built.answer("HEAD", "/console/").status == 200


def test_the_bare_prefix_redirects_and_health_answers(built: ConsoleAssets) -> None:
    moved = built.answer("GET", "/console")
    assert moved.status == 308
    assert moved.header("Location") == "/console/"
    assert built.answer("GET", "/healthz").status == 200


def test_a_matching_etag_is_not_modified(built: ConsoleAssets) -> None:
    first = built.answer("GET", "/console/")
    etag = first.header("ETag")
    assert etag
    again = built.answer("GET", "/console/", if_none_match=etag)
    assert again.status == 304
    assert again.body == b""


def test_an_unbuilt_console_says_how_to_build_it(tmp_path: Path) -> None:
    assets = ConsoleAssets(tmp_path / "missing")
    answer = assets.answer("GET", "/console/")
    assert answer.status == 503
    assert b"make console" in answer.body
    assert assets.answer("GET", "/healthz").status == 200


def test_the_policy_allows_no_inline_code_and_no_other_origin() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY
