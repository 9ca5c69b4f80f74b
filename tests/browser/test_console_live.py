"""The job detail's logs and live updates in real headless Chromium against the whole stack: output shown while
the job runs and all of it after, another tenant's logs refused, state changes from the watch stream (not by
polling GetJob), a watch stream that ends early reopened, and polling only once the stream keeps failing."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from devtools.launcher import Stack
from tests.browser.conftest import Watched
from tests.browser.test_console import sign_in, unique
from tests.helpers import Api, job_spec, wait_for

LINES = [f"line-{i}" for i in range(1, 7)]
# Six lines a second apart: the first ones come while the job runs, even on a loaded machine.
PRINTER = "for i in 1 2 3 4 5 6; do echo line-$i; sleep 1; done"

# The state badge and the log's text at the same instant, once the log shows a line while the badge says Running.
RUNNING_WITH_A_LINE = """() => {
  const state = document.querySelector('[data-testid=job-state]')?.textContent;
  const log = document.querySelector('[data-testid=job-logs]')?.textContent ?? '';
  return state === 'Running' && log.includes('line-1') ? log : false;
}"""


def paths(w: Watched) -> list[str]:
    return [urlsplit(u).path for u, _ in w.requests]


def job_reads(w: Watched, job_id: str) -> int:
    """GetJob requests of this job (the path without a verb or a sub-resource): what polling would make."""
    return paths(w).count(f"/api/v1/jobs/{job_id}")


def watches(w: Watched, job_id: str) -> int:
    return paths(w).count(f"/api/v1/jobs/{job_id}:watch")


def test_the_job_detail_shows_the_output_while_the_job_runs_and_all_of_it_after(
    stack: Stack, acme: Api, watched: Watched
) -> None:
    job = acme.submit(job_spec(unique("console-printer"), ["sh", "-c", PRINTER]))
    page = sign_in(watched, stack, acme.token, view=f"jobs/{job['job_id']}")
    page.evaluate("window.__notReloaded = true")
    early = page.wait_for_function(RUNNING_WITH_A_LINE, timeout=45_000).json_value()
    assert LINES[-1] not in early  # shown while it printed, not at the end
    logs = page.get_by_test_id("job-logs")
    assert logs.get_attribute("role") == "region" and logs.get_attribute("aria-label")
    assert logs.get_attribute("tabindex") == "0"  # keyboard users can scroll it
    watched.screenshot("job-detail-logs-running")
    page.wait_for_selector("[data-testid=job-state]:text('Succeeded')", timeout=45_000)
    wait_for(lambda: logs.inner_text().split() == LINES, timeout=20, what="every line in the log")
    assert page.evaluate("window.__notReloaded") is True
    page.get_by_test_id("logs-status").get_by_text("whole output").wait_for()  # the follow stream closed
    assert paths(watched).count(f"/api/v1/jobs/{job['job_id']}/logs") == 1  # one stream from pending to the end
    assert any("follow=true" in u for u, _ in watched.requests if "/logs" in u)
    watched.screenshot("job-detail-logs")


def test_a_job_without_output_says_so(stack: Stack, acme: Api, watched: Watched) -> None:
    job = acme.wait_terminal(acme.submit(job_spec(unique("console-quiet"), ["true"]))["job_id"])
    page = sign_in(watched, stack, acme.token, view=f"jobs/{job['job_id']}")
    page.get_by_test_id("logs-status").get_by_text("wrote no output").wait_for()


def test_another_tenants_logs_are_refused_in_the_console(
    stack: Stack, acme: Api, globex: Api, watched: Watched
) -> None:
    theirs = globex.submit(job_spec(unique("globex-printer"), ["sh", "-c", "echo globex-output-4711"]))
    globex.wait_terminal(theirs["job_id"])
    page = watched.page
    answers: list[tuple[str, int]] = []
    page.on("response", lambda r: answers.append((urlsplit(r.url).path, r.status)))
    sign_in(watched, stack, acme.token, view=f"jobs/{theirs['job_id']}")
    refused = page.get_by_test_id("logs-error")
    refused.wait_for()
    assert "JOB_NOT_FOUND" in refused.inner_text()
    assert (f"/api/v1/jobs/{theirs['job_id']}/logs", 404) in answers
    assert page.get_by_test_id("job-logs").count() == 0  # an error, not an empty log
    assert "globex-output-4711" not in page.content()
    watched.screenshot("job-detail-logs-refused")


def test_the_job_detail_follows_its_job_through_the_watch_stream_not_by_polling(
    stack: Stack, acme: Api, watched: Watched
) -> None:
    job = acme.submit(job_spec(unique("console-watched"), ["sh", "-c", "sleep 5"]))
    page = sign_in(watched, stack, acme.token, view=f"jobs/{job['job_id']}")
    page.evaluate("window.__notReloaded = true")
    page.wait_for_selector("[data-testid=job-state]:text('Running')", timeout=45_000)
    page.wait_for_selector("[data-testid=job-state]:text('Succeeded')", timeout=45_000)
    assert "Attempt 1 running" in page.get_by_test_id("timeline").inner_text()
    assert page.evaluate("window.__notReloaded") is True
    assert watches(watched, job["job_id"]) == 1
    assert job_reads(watched, job["job_id"]) == 0  # every change came from the stream


def test_a_watch_stream_that_ends_early_is_opened_again(stack: Stack, acme: Api, watched: Watched) -> None:
    job = acme.submit(job_spec(unique("console-rewatch"), ["sh", "-c", "sleep 2"]))
    pending = {**acme.get(job["job_id"]), "state": "JOB_STATE_PENDING"}
    page = watched.page
    cut: list[str] = []

    def cut_the_first(route: Any) -> None:
        if not cut:
            cut.append(route.request.url)
            # The job as it was, then the stream ends before the job does.
            route.fulfill(status=200, content_type="application/json", body=json.dumps(pending) + "\n")
        else:
            route.continue_()

    page.route(f"**/api/v1/jobs/{job['job_id']}:watch", cut_the_first)
    sign_in(watched, stack, acme.token, view=f"jobs/{job['job_id']}")
    page.wait_for_selector("[data-testid=job-state]:text('Succeeded')", timeout=45_000)
    assert cut and watches(watched, job["job_id"]) >= 2
    assert job_reads(watched, job["job_id"]) == 0


def test_the_job_detail_polls_only_when_the_watch_stream_keeps_failing(
    stack: Stack, acme: Api, watched: Watched
) -> None:
    job = acme.submit(job_spec(unique("console-nowatch"), ["sh", "-c", "sleep 2"]))
    page = watched.page
    page.route(
        f"**/api/v1/jobs/{job['job_id']}:watch",
        lambda route: route.fulfill(status=503, content_type="text/plain", body="upstream connect error"),
    )
    sign_in(watched, stack, acme.token, view=f"jobs/{job['job_id']}")
    page.wait_for_selector("[data-testid=job-state]:text('Succeeded')", timeout=60_000)
    # Three tries with backoff before the first GetJob, then light polling.
    order = [p for p in paths(watched) if p.startswith(f"/api/v1/jobs/{job['job_id']}") and "/logs" not in p]
    first_read = order.index(f"/api/v1/jobs/{job['job_id']}")
    assert order[:first_read].count(f"/api/v1/jobs/{job['job_id']}:watch") >= 3, order


def test_a_long_log_keeps_its_last_mebibyte_in_the_page_and_says_so(stack: Stack, acme: Api, watched: Watched) -> None:
    # 1..200000, one a line: about 1.3 MB, more than the page keeps.
    job = acme.wait_terminal(acme.submit(job_spec(unique("console-long"), ["seq", "1", "200000"]))["job_id"])
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    page = sign_in(watched, stack, acme.token, view=f"jobs/{job['job_id']}")
    page.get_by_test_id("logs-trimmed").wait_for(timeout=30_000)
    page.get_by_test_id("logs-status").get_by_text("whole output").wait_for()
    shown = page.get_by_test_id("job-logs").evaluate("el => el.textContent")
    assert len(shown) <= 1024 * 1024
    lines = shown.split()
    first = int(lines[0])
    assert first > 1 and lines == [str(n) for n in range(first, 200_001)]  # whole lines, the newest kept
    assert "jobmesh logs" in page.get_by_test_id("logs-trimmed").inner_text()


def test_leaving_the_job_detail_closes_its_streams(stack: Stack, acme: Api, watched: Watched) -> None:
    job = acme.submit(job_spec(unique("console-leave"), ["sleep", "30"]))
    try:
        page = watched.page
        aborted: list[str] = []
        page.on("requestfailed", lambda r: aborted.append(urlsplit(r.url).path))
        sign_in(watched, stack, acme.token, view=f"jobs/{job['job_id']}")
        page.wait_for_selector("[data-testid=job-state]:text('Running')", timeout=45_000)
        page.get_by_test_id("logs-status").get_by_text("Follow").wait_for()
        page.get_by_role("link", name="← Jobs").click()
        page.wait_for_selector("[data-testid=jobs-table]")
        streams = {f"/api/v1/jobs/{job['job_id']}:watch", f"/api/v1/jobs/{job['job_id']}/logs"}
        wait_for(lambda: streams <= set(aborted), timeout=10, what="both streams aborted")
    finally:
        acme.cancel(job["job_id"])
