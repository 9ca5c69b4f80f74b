"""Unit tests for the gateway's metrics merge (services/gateway/metrics_scrape.py), with no targets: no sockets."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics_scrape import scrape_all

OWN = """\
# HELP jobmesh_queue_depth Jobs waiting per queue.
# TYPE jobmesh_queue_depth gauge
jobmesh_queue_depth{queue="default"} 3.0
jobmesh_queue_depth{queue="gpu"} 1.0
# HELP jobmesh_workers_idle Idle workers.
# TYPE jobmesh_workers_idle gauge
jobmesh_workers_idle 2.0
"""


async def merged(own: str) -> str:
    return await scrape_all((), own)


def directives(text: str, kind: str) -> list[str]:
    return [line.split()[2] for line in text.splitlines() if line.startswith(f"# {kind} ")]


def samples(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@pytest.mark.asyncio
async def test_each_family_gets_exactly_one_help_and_type_line() -> None:
    text = await merged(OWN)

    for kind in ("HELP", "TYPE"):
        names = directives(text, kind)
        assert sorted(names) == ["jobmesh_queue_depth", "jobmesh_up", "jobmesh_workers_idle"]
    assert "# TYPE jobmesh_queue_depth gauge" in text.splitlines()


@pytest.mark.asyncio
async def test_every_sample_is_labelled_with_its_instance() -> None:
    text = await merged(OWN)

    lines = samples(text)
    assert len(lines) == 4  # three own samples plus jobmesh_up
    assert all('instance="gateway"' in line for line in lines), lines
    assert 'jobmesh_queue_depth{instance="gateway",queue="gpu"} 1.0' in lines


@pytest.mark.asyncio
async def test_the_gateway_reports_itself_up() -> None:
    text = await merged(OWN)

    assert 'jobmesh_up{instance="gateway"} 1' in samples(text)
    assert text.endswith("\n")


@pytest.mark.asyncio
async def test_empty_own_metrics_mark_the_gateway_down() -> None:
    text = await merged("")

    assert samples(text) == ['jobmesh_up{instance="gateway"} 0']


@pytest.mark.asyncio
async def test_the_merged_text_parses_back_to_the_same_gauge_values() -> None:
    text = await merged(OWN)

    parsed = {
        (s.name, s.labels.get("queue", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    assert parsed == {
        ("jobmesh_up", ""): 1.0,
        ("jobmesh_queue_depth", "default"): 3.0,
        ("jobmesh_queue_depth", "gpu"): 1.0,
        ("jobmesh_workers_idle", ""): 2.0,
    }


@pytest.mark.asyncio
async def test_label_values_are_escaped() -> None:
    own = '# TYPE odd gauge\nodd{path="C:\\\\dir",quote="say \\"hi\\""} 1\n'

    text = await merged(own)

    [sample] = [s for f in text_string_to_metric_families(text) if f.name == "odd" for s in f.samples]
    assert sample.labels == {"path": "C:\\dir", "quote": 'say "hi"', "instance": "gateway"}


@pytest.mark.asyncio
async def test_a_counter_keeps_its_type_through_the_merge() -> None:
    registry = CollectorRegistry()
    Counter("jobmesh_jobs_total", "Jobs submitted.", ["tenant"], registry=registry).labels("acme").inc(3)
    Gauge("jobmesh_queue_depth", "Depth.", registry=registry).set(2)

    text = await merged(generate_latest(registry).decode())

    types = {s.name: f.type for f in text_string_to_metric_families(text) for s in f.samples}
    assert types["jobmesh_jobs_total"] == "counter"
    assert re.search(r"^# TYPE jobmesh_jobs_total counter$", text, re.MULTILINE)


@pytest.mark.asyncio
async def test_a_gateway_among_the_targets_labels_itself_with_its_address_and_does_not_fetch_itself() -> None:
    # Port 9 (discard) on loopback: nothing answers there, so a fetch of it would report it down.
    text = await scrape_all(("127.0.0.1:9",), OWN, own_address="127.0.0.1:9")

    lines = samples(text)
    assert 'jobmesh_up{instance="127.0.0.1:9"} 1' in lines
    assert 'jobmesh_queue_depth{instance="127.0.0.1:9",queue="gpu"} 1.0' in lines
    assert not any('instance="gateway"' in line for line in lines), lines
