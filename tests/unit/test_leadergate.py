"""The leader gate over fakes: a term is served only once the state caught up with it, closed the moment it ends,
and a dead election or informer makes the process report NOT_SERVING and exit to be restarted."""

from __future__ import annotations

import asyncio

import pytest

from libs.errors import Unavailable
from libs.etcd.election import Leadership
from libs.leadergate import SELF_CHECK_FAILED, LeaderGate, SelfCheck

SERVICE = "jobmesh.quota.v1.QuotaService"


class Election:
    def __init__(self) -> None:
        self.leadership: Leadership | None = None
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def lead(self, revision: int) -> None:
        self.leadership = Leadership("/jobmesh/leader/quota", revision, 1)
        self.changed.set()

    def lose(self) -> None:
        self.leadership = None
        self.changed.set()


class Informer:
    name = "jobs"

    def __init__(self) -> None:
        self.revision = 0
        self.moved = asyncio.Event()
        self.running = True

    async def wait_revision(self, revision: int, timeout: float = 10.0) -> None:
        async def reached() -> None:
            while self.revision < revision:
                self.moved.clear()
                await self.moved.wait()

        await asyncio.wait_for(reached(), timeout)

    def advance(self, revision: int) -> None:
        self.revision = revision
        self.moved.set()


class Health:
    def __init__(self) -> None:
        self.status: dict[str, bool] = {}

    async def set_service_serving(self, name: str, serving: bool) -> None:
        self.status[name] = serving


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


def gate_over(election: Election, informer: Informer, terms: list[int | None], exits: list[int]) -> LeaderGate:
    return LeaderGate(
        election,  # type: ignore[arg-type]
        [informer],
        SERVICE,
        lambda term: terms.append(term.revision if term else None),
        poll=0.01,
        exit_process=exits.append,
    )


@pytest.mark.asyncio
async def test_a_term_is_served_only_once_the_state_has_caught_up_with_it_and_closed_when_it_ends() -> None:
    election, informer, health = Election(), Informer(), Health()
    terms: list[int | None] = []
    gate = gate_over(election, informer, terms, [])
    runner = asyncio.create_task(gate.run(health))
    try:
        election.lead(42)
        await settle()
        assert health.status.get(SERVICE) is not True  # writes before the term may not be seen yet
        with pytest.raises(Unavailable) as refused:
            gate.token()
        assert refused.value.reason == "NOT_LEADER"

        informer.advance(42)
        await settle()
        assert health.status[SERVICE] is True
        assert gate.token().revision == 42
        assert terms == [42]

        election.lose()
        await settle()
        assert health.status[SERVICE] is False
        assert terms == [42, None]
        with pytest.raises(Unavailable):
            gate.token()
    finally:
        runner.cancel()


@pytest.mark.asyncio
async def test_a_token_of_a_term_the_election_has_left_is_refused_even_before_the_gate_notices() -> None:
    election, informer, health = Election(), Informer(), Health()
    gate = gate_over(election, informer, [], [])
    informer.advance(10)
    runner = asyncio.create_task(gate.run(health))
    try:
        election.lead(10)
        await settle()
        assert gate.token().revision == 10
        election.leadership = Leadership("/jobmesh/leader/quota", 11, 2)  # a new term, not yet seen by the gate
        with pytest.raises(Unavailable):
            gate.token()
    finally:
        runner.cancel()


@pytest.mark.asyncio
@pytest.mark.parametrize("what", ["election", "informer"])
async def test_a_dead_election_or_informer_reports_not_serving_and_exits_to_be_restarted(what: str) -> None:
    election, informer, health = Election(), Informer(), Health()
    exits: list[int] = []
    gate = gate_over(election, informer, [], exits)
    informer.advance(5)
    runner = asyncio.create_task(gate.run(health))
    try:
        election.lead(5)
        await settle()
        assert health.status[SERVICE] is True
        if what == "election":

            async def crash() -> None:
                raise RuntimeError("boom")

            election.task = asyncio.create_task(crash())
        else:
            informer.running = False
        await settle()
        assert exits and exits[0] == SELF_CHECK_FAILED
        assert health.status[""] is False and health.status[SERVICE] is False
        assert what in gate.self_check.failed
    finally:
        runner.cancel()


@pytest.mark.asyncio
async def test_a_replica_without_a_gated_service_fails_its_self_check_when_its_election_dies() -> None:
    election, health = Election(), Health()
    exits: list[int] = []
    check = SelfCheck(election, exit_process=exits.append)  # type: ignore[arg-type]
    runner = asyncio.create_task(check.run(health, poll=0.01))
    await settle()
    assert not runner.done() and exits == []

    async def crash() -> None:
        raise RuntimeError("boom")

    election.task = asyncio.create_task(crash())
    await settle()
    assert runner.done() and exits == [SELF_CHECK_FAILED]
    assert health.status == {"": False}


@pytest.mark.asyncio
async def test_the_gate_waits_for_informers_added_to_its_list_after_it_was_built() -> None:
    # The cost and queueing services fill the list once their informers exist, after building the gate.
    election, health = Election(), Health()
    informers: list[Informer] = []
    gate = LeaderGate(election, informers, SERVICE, poll=0.01)  # type: ignore[arg-type]
    late = Informer()
    informers.append(late)
    runner = asyncio.create_task(gate.run(health))
    try:
        election.lead(7)
        await settle()
        assert health.status.get(SERVICE) is not True
        late.advance(7)
        await settle()
        assert health.status[SERVICE] is True
    finally:
        runner.cancel()
