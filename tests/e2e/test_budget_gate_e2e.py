"""The budget gate with the cost service stopped, through Envoy: failing open (the default) admits every tenant's
submits; failing closed refuses those of tenants whose budget is enforced with 503 BUDGET_CHECK_UNAVAILABLE and
admits the others; both answer as before once cost is back."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.launcher import Stack
from services.gateway.budgets import ANSWER_SECONDS
from tests.e2e.test_cost_e2e import COST_CONFIG
from tests.helpers import FAST_FAILOVER, Api, job_spec, start_stack, token, wait_for

JOBS = "/api/v1/jobs"


def config_failing(mode: str, dest: Path) -> Path:
    """The cost fixture with globex on an enforced (far from spent) budget and budget checks failing `mode`."""
    text = COST_CONFIG.read_text()
    text = text.replace(
        "[tenants.globex]\nweight = 2\n",
        '[tenants.globex]\nweight = 2\nmonthly_budget = 1000000.0\nbudget_policy = "enforce"\n',
    )
    text = text.replace('[cost]\ncurrency = "EUR"\n', f'[cost]\ncurrency = "EUR"\nbudget_check_failure = "{mode}"\n')
    assert "budget_check_failure" in text and 'budget_policy = "enforce"' in text
    path = dest / f"cost-{mode}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module", params=["open", "closed"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp(f"budget-{request.param}")
    stack = start_stack(data / "stack", env=dict(FAST_FAILOVER), config=config_failing(request.param, data))
    try:
        yield stack
    finally:
        stack.stop()


def submit(api: Api, name: str) -> tuple[int, str]:
    resp = api.call("POST", JOBS, json=job_spec(name, ["true"]))
    details = resp.json().get("details", []) if resp.status_code != 200 else []
    return resp.status_code, details[0]["reason"] if details else ""


def test_submits_with_the_cost_service_stopped_follow_the_configured_failure_mode(stack: Stack) -> None:
    closed = "closed" in stack.config_path.name
    acme, globex, initech = (Api(stack.url, token(stack, t)) for t in ("acme", "globex", "initech"))
    admin = Api(stack.url, token(stack, "acme", admin=True))
    # An admin puts initech (notify in config) on an enforced budget: the gateway learns it from the cost service.
    put = admin.call("PUT", "/api/v1/tenants/initech/budget", json={"monthly_limit": "1000000", "policy": "enforce"})
    assert put.status_code == 200, put.text
    # Twice each: Envoy alternates between the two gateways, and each learns the budgets from the cost service.
    for api, name in ((acme, "a"), (globex, "g"), (initech, "i")):
        for n in range(2):
            assert submit(api, f"{name}-before-{n}") == (200, "")

    replicas = ("cost-1", "cost-2")
    for name in replicas:  # both: the cost service is down, not failing over
        stack.kill(name, signal.SIGKILL)
    time.sleep(ANSWER_SECONDS + 0.5)  # no gateway goes by an answer it had before
    try:
        assert submit(acme, "a-down") == (200, "")  # no enforced budget: admitted either way
        for api, name in ((globex, "g-down"), (initech, "i-down")):
            for n in range(2):
                assert submit(api, f"{name}-{n}") == ((503, "BUDGET_CHECK_UNAVAILABLE") if closed else (200, ""))
    finally:
        for name in replicas:
            stack.restart(name)

    wait_for(lambda: submit(globex, "g-back") == (200, ""), timeout=60, what="submits once cost is back")
    assert submit(initech, "i-back") == (200, "")
