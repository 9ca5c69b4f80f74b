"""Unit tests for the worker's health check (services/worker/health.py): real commands, a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.health import HealthCheck

pytestmark = pytest.mark.asyncio


async def test_a_writable_scratch_dir_with_room_and_no_command_is_healthy(tmp_path: Path) -> None:
    assert await HealthCheck(str(tmp_path)).check() == ""


async def test_a_missing_scratch_dir_is_unhealthy(tmp_path: Path) -> None:
    reason = await HealthCheck(str(tmp_path / "gone")).check()

    assert "scratch directory" in reason


async def test_too_little_free_space_is_unhealthy(tmp_path: Path) -> None:
    reason = await HealthCheck(str(tmp_path), min_free_mb=10**12).check()

    assert "MB free" in reason


async def test_a_failing_command_is_unhealthy_with_its_output_and_stays_so(tmp_path: Path) -> None:
    marker = tmp_path / "sick"
    check = HealthCheck(
        str(tmp_path),
        ["sh", "-c", 'test ! -e "$MARKER" || { echo "disk on fire"; exit 3; }'],
        0.0,
        0,
        {"MARKER": str(marker)},
    )
    assert await check.check() == ""
    marker.touch()

    reason = await check.check()

    assert reason == "health check exited 3: disk on fire"
    marker.unlink()
    assert await check.check() == reason  # replaced, not healed


async def test_the_command_runs_at_most_once_per_interval(tmp_path: Path) -> None:
    count = tmp_path / "count"
    check = HealthCheck(str(tmp_path), ["sh", "-c", f'echo x >> "{count}"'], interval=3600.0, min_free_mb=0)

    for _ in range(3):
        assert await check.check() == ""

    assert count.read_text().count("x") == 1


async def test_a_command_that_cannot_start_is_unhealthy(tmp_path: Path) -> None:
    reason = await HealthCheck(str(tmp_path), ["/nonexistent/probe"], 0.0, 0).check()

    assert reason.startswith("health check could not start")
