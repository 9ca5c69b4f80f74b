"""The web console in real headless Chromium against the whole stack: login, live jobs, cancel, why a job
waits, cost, and tenant isolation. Each test leaves screenshots in build/screenshots."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest

from devtools.launcher import Stack
from tests.browser.conftest import Watched
from tests.helpers import Api, job_spec, wait_for

WAITING_REASONS = {"QUEUED", "BEHIND_FAIR_SHARE", "WAITING_FOR_WORKER", "POOL_SCALING_UP"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sign_in(w: Watched, stack: Stack, token: str, view: str = "") -> Any:
    page = w.page
    page.goto(f"{stack.url}/console/#token={token}")
    page.wait_for_selector("[data-testid=jobs-table][aria-busy=false]")
    if view:
        page.goto(f"{stack.url}/console/#/{view}")
    return page


def row(page: Any, job_id: str) -> Any:
    return page.locator(f"tr[data-job-id='{job_id}']")


def test_without_a_token_only_the_login_is_shown(stack: Stack, watched: Watched) -> None:
    page = watched.page
    page.goto(f"{stack.url}/console/#/jobs")
    page.get_by_label("API token (JWT)").wait_for()
    assert page.locator("nav[aria-label=Views]").count() == 0
    assert page.locator("[data-testid=jobs-table]").count() == 0
    assert not [u for u, _ in watched.requests if "/api/v1/" in u]
    watched.screenshot("login")


def test_a_token_fragment_signs_in_and_the_token_goes_only_to_the_api(
    stack: Stack, acme: Api, watched: Watched
) -> None:
    page = sign_in(watched, stack, acme.token)
    assert "token=" not in page.url
    assert page.evaluate("sessionStorage.getItem('jobmesh.console.token')") == acme.token
    stored = page.evaluate("Object.values(localStorage).join(' ')")
    assert acme.token not in stored
    origin = urlsplit(stack.url).netloc
    assert all(urlsplit(u).netloc == origin for u, _ in watched.requests), watched.requests
    with_token = [u for u, auth in watched.requests if auth]
    assert with_token and all(urlsplit(u).path.startswith("/api/v1/") for u in with_token)
    assert all(auth == f"Bearer {acme.token}" for _, auth in watched.requests if auth)
    assert not [u for u, _ in watched.requests if "token=" in u]


def test_a_pasted_token_signs_in_and_signing_out_forgets_it(stack: Stack, globex: Api, watched: Watched) -> None:
    page = watched.page
    page.goto(f"{stack.url}/console/")
    page.get_by_label("API token (JWT)").fill(globex.token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("[data-testid=jobs-table][aria-busy=false]")
    assert "Tenant globex" in page.locator(".view-head").inner_text()
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API token (JWT)").wait_for()
    assert page.evaluate("sessionStorage.length + Object.keys(localStorage).length") == 0


def test_the_views_are_reachable_by_keyboard_alone(stack: Stack, acme: Api, watched: Watched) -> None:
    page = sign_in(watched, stack, acme.token)
    page.locator("body").focus()
    for _ in range(10):  # Tab through the skip link and the navigation to "Pools"
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "Pools":
            break
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Pools", level=1).wait_for()
    assert page.get_by_role("link", name="Pools").get_attribute("aria-current") == "page"


def test_a_job_submitted_through_the_api_appears_and_succeeds_without_a_reload(
    stack: Stack, acme: Api, watched: Watched
) -> None:
    page = sign_in(watched, stack, acme.token)
    page.evaluate("window.__notReloaded = true")
    job = acme.submit(job_spec(unique("console-live"), ["sh", "-c", "sleep 1; echo done"]))
    row(page, job["job_id"]).wait_for()
    page.wait_for_selector(f"tr[data-job-id='{job['job_id']}'][data-state=JOB_STATE_SUCCEEDED]", timeout=45_000)
    assert page.evaluate("window.__notReloaded") is True
    watched.screenshot("jobs")
    row(page, job["job_id"]).get_by_role("link").click()
    page.wait_for_selector("[data-testid=timeline] li >> nth=2")
    assert page.get_by_test_id("job-state").inner_text() == "Succeeded"
    assert "Attempt 1 running" in page.get_by_test_id("timeline").inner_text()
    watched.screenshot("job-detail")


def test_jobs_are_cancelled_from_the_console(stack: Stack, acme: Api, watched: Watched) -> None:
    page = sign_in(watched, stack, acme.token)
    jobs = [acme.submit(job_spec(unique("console-cancel"), ["sleep", "60"])) for _ in range(2)]
    for job in jobs:
        row(page, job["job_id"]).get_by_role("checkbox").check()
    page.get_by_role("button", name="Cancel selected (2)").click()
    page.get_by_role("button", name="Yes, cancel").click()
    for job in jobs:
        page.wait_for_selector(f"tr[data-job-id='{job['job_id']}'][data-state=JOB_STATE_CANCELLED]")
        assert acme.get(job["job_id"])["state"] == "JOB_STATE_CANCELLED"
    assert "Cancelled 2 of 2 jobs" in page.locator(".bulk").inner_text()


def test_the_job_detail_shows_why_a_job_waits_and_its_queue_position(stack: Stack, acme: Api, watched: Watched) -> None:
    # static-general has 3 workers of 1 CPU: three 1-CPU sleepers fill it, so the next pinned jobs wait.
    full = dict(pool="static-general", resources={"cpu_millis": 1000, "memory_mb": 64})
    sleepers = [acme.submit(job_spec(unique("console-fill"), ["sleep", "30"], **full)) for _ in range(3)]
    waiting = [acme.submit(job_spec(unique("console-wait"), ["sleep", "1"], **full)) for _ in range(2)]
    try:
        for job in sleepers:
            acme.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
        behind = waiting[1]
        page = sign_in(watched, stack, acme.token, view=f"jobs/{behind['job_id']}")
        page.get_by_test_id("queue-position").wait_for()
        wait_for(
            lambda: page.get_by_test_id("waiting-reason").inner_text() in WAITING_REASONS,
            what="a waiting reason",
        )
        position = page.get_by_test_id("queue-position").inner_text()
        assert re.fullmatch(r"#\d+", position), position
        assert int(position[1:]) >= 2  # the other waiting job is ahead of it
        assert acme.get(behind["job_id"])["state"] == "JOB_STATE_PENDING"
        assert "ahead of it" in page.locator("#waiting-h + dl").inner_text()
        watched.screenshot("job-detail-pending")
    finally:
        for job in sleepers + waiting:
            acme.cancel(job["job_id"])


def test_the_cost_chart_renders_with_data(stack: Stack, acme: Api, watched: Watched) -> None:
    job = acme.submit(job_spec(unique("console-cost"), ["sh", "-c", "echo cost"]))
    acme.wait_terminal(job["job_id"])

    def charged() -> bool:
        reports = acme.call("GET", "/api/v1/cost-optimization/reports").json()["reports"]
        return any(int(r["total"]["micros"]) > 0 for r in reports)

    wait_for(charged, timeout=30, what="a charged job in the cost report")
    page = sign_in(watched, stack, acme.token, view="cost")
    chart = page.get_by_test_id("cost-chart")
    chart.wait_for()
    wait_for(
        lambda: any(_number(c) > 0 for c in chart.locator("td").all_text_contents()),
        what="a non-zero day in the cost chart's numbers",
    )
    assert chart.get_attribute("data-points") == "14"
    drawn = page.evaluate(
        "() => { const c = document.querySelector('[data-testid=cost-chart] canvas');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"
    )
    assert drawn > 1000  # axes, labels and bars, not a blank canvas
    watched.screenshot("cost")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def test_another_tenants_jobs_never_appear(stack: Stack, acme: Api, globex: Api, watched: Watched) -> None:
    secret = unique("globex-secret")
    theirs = globex.submit(job_spec(secret))
    page = watched.page
    listed: list[dict[str, Any]] = []

    def on_response(resp: Any) -> None:
        if urlsplit(resp.url).path == "/api/v1/jobs" and resp.ok:
            listed.extend(json.loads(resp.body())["jobs"])

    page.on("response", on_response)
    sign_in(watched, stack, acme.token)
    page.get_by_label("Name contains").fill("globex-secret")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_selector("td.placeholder")
    wait_for(lambda: len(listed) > 0, what="a job list answer")
    assert secret not in page.content()
    assert listed and all(j["tenant_id"] == "acme" for j in listed)
    page.goto(f"{stack.url}/console/#/jobs/{theirs['job_id']}")
    refusal = page.get_by_role("alert").first  # the job's, then its logs' (tests/browser/test_console_live.py)
    refusal.wait_for()
    assert "not found" in refusal.inner_text().lower()
    assert secret not in page.content()


@pytest.mark.parametrize("view", ["tenants", "pools"])
def test_the_tenant_and_pool_views_render_their_charts(stack: Stack, acme: Api, watched: Watched, view: str) -> None:
    page = sign_in(watched, stack, acme.token, view=view)
    chart = "share-chart" if view == "tenants" else "utilization-chart"
    # Samples accumulate while the page is open: two of them make a line.
    page.wait_for_selector(f"[data-testid={chart}][data-points='2']", timeout=20_000)
    if view == "tenants":
        assert "of 2000" in page.get_by_test_id("quota").inner_text()
    else:
        assert page.locator("section.panel h2", has_text="static-general").count() == 1
    watched.screenshot(view)
