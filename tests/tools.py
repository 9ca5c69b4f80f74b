"""External tools the checks run (promtool, amtool, kubectl, kubernetes-validate): found on PATH or next to the
test interpreter (the venv's bin, where `make test` installs the PyPI ones). Missing on a developer machine, the
check is skipped with the way to get the tool; under CI (CI=true) a missing tool fails the check, so CI can never
be green with a check silently skipped."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def find_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def require_tool(name: str, how: str) -> str:
    """The tool's path; else skip (fail under CI) saying how to install it."""
    path = find_tool(name)
    if path is not None:
        return path
    why = f"{name} is not installed ({how})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"under CI every check runs: {why}")
    pytest.skip(why)
