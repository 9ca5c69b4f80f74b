"""The per-tenant cap on stored job records (services/queueing/stored.py)."""

from __future__ import annotations

import pytest

from libs.errors import ResourceExhausted
from services.queueing.stored import StoredJobs


def test_creates_in_flight_count_toward_the_cap_and_the_refusal_names_it() -> None:
    stored = StoredJobs(cap=3)
    stored.seen("acme", "j1")
    stored.reserve("acme")
    stored.reserve("acme")
    with pytest.raises(ResourceExhausted) as refused:
        stored.reserve("acme")
    assert refused.value.reason == "TOO_MANY_JOBS"
    assert refused.value.metadata == {"limit": "3", "stored": "3"}
    stored.reserve("globex")  # another tenant is not held back


def test_a_create_that_wrote_nothing_frees_its_place_and_the_informer_does_not_count_twice() -> None:
    stored = StoredJobs(cap=2)
    stored.reserve("acme")
    stored.release("acme", "j1")
    stored.seen("acme", "j1")  # the informer's put of the same record
    stored.reserve("acme")
    stored.release("acme", None)  # an idempotent replay: nothing new stored
    assert stored.count("acme") == 1
    stored.reserve("acme")


def test_deleted_records_free_their_places() -> None:
    stored = StoredJobs(cap=1)
    stored.seen("acme", "j1")
    with pytest.raises(ResourceExhausted):
        stored.reserve("acme")
    stored.gone("acme", "j1")
    stored.gone("acme", "never-seen")
    stored.reserve("acme")
    assert stored.count("acme") == 0
