"""The worker's protocol against real grpc.aio servers (bench/worker_agent.py's pool-manager stand-in): results
on the Attach stream, acknowledged there, and the fallback to Connect and ReportResult when a pool-manager
has no Attach. A real worker process runs real `true` jobs both ways, each in its job sandbox."""

from __future__ import annotations

import argparse

import pytest

from bench.worker_agent import run


@pytest.mark.asyncio
@pytest.mark.parametrize("without_attach", [False, True], ids=["attach", "connect-only"])
async def test_every_job_is_assigned_run_and_reported_once(without_attach: bool) -> None:
    args = argparse.Namespace(
        jobs=30, command=["true"], timeout_seconds=60.0, without_attach=without_attach, sandbox="bwrap", network="none"
    )

    result = await run(args)

    assert result["jobs"] == 30
    assert result["failed"] == 0
    assert result["results_on_stream"] == (0 if without_attach else 30)
