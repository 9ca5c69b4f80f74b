"""The external checkers' lookup (tests/tools.py): a missing tool skips its check on a developer machine and fails
it under CI, so CI cannot be green with a check skipped (issue 19)."""

from __future__ import annotations

import pytest

from tests.tools import require_tool

MISSING = "jobmesh-no-such-checker"


def test_a_missing_tool_fails_its_check_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")

    with pytest.raises(pytest.fail.Exception, match=f"under CI every check runs: {MISSING} is not installed"):
        require_tool(MISSING, "how to get it")


def test_a_missing_tool_skips_its_check_elsewhere_saying_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)

    with pytest.raises(pytest.skip.Exception, match="how to get it"):
        require_tool(MISSING, "how to get it")


def test_a_tool_on_the_path_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")

    assert require_tool("sh", "coreutils").endswith("/sh")
