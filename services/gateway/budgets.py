"""The gateway's budget gate: may a tenant still submit? Asks the cost service, remembers the answer briefly, and
decides what a submit gets when the cost service cannot answer."""

from __future__ import annotations

import logging

import grpc

from jobmesh.cost.v1 import cost_pb2 as c
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import JobMeshError, Unavailable
from libs.interceptors import error_from_rpc

log = logging.getLogger(__name__)

# How long a gateway remembers the cost service's answer for a tenant (each gateway its own).
ANSWER_SECONDS = 2.0


class BudgetGate:
    """Asks the cost service whether a tenant may still submit; remembers the answer briefly to stay off the hot
    path (an enforced budget may overshoot by what is submitted within that window).

    When the cost service cannot answer, a submit is admitted (fail open, the default: budgets are checked again
    shortly) or, with `[cost] budget_check_failure = "closed"`, refused with 503 BUDGET_CHECK_UNAVAILABLE if the
    tenant's budget is enforced: as the cost service last said, or as the mesh config says before it has said."""

    def __init__(self, cost: object, clock: Clock, config: MeshConfig, ttl: float = ANSWER_SECONDS):
        self.cost = cost
        self.clock = clock
        self.ttl = ttl
        self.fail_closed = config.budget_check_failure == "closed"
        self.config = config
        self._known: dict[str, tuple[float, JobMeshError | None]] = {}
        self._enforced: dict[str, bool] = {}  # the cost service's last word on each tenant

    def enforced(self, tenant_id: str) -> bool:
        known = self._enforced.get(tenant_id)
        if known is not None:
            return known
        tenant = self.config.tenants.get(tenant_id)
        return tenant is not None and tenant.budget_enforced

    async def check(self, tenant_id: str) -> None:
        now = self.clock.monotonic()
        known = self._known.get(tenant_id)
        if known is None or now - known[0] > self.ttl:
            refusal: JobMeshError | None = None
            try:
                answer = await self.cost.CheckBudget(c.CheckBudgetRequest(tenant_id=tenant_id), timeout=2.0)  # type: ignore[attr-defined]
                self._enforced[tenant_id] = answer.enforced
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.unanswered(tenant_id, exc.code().name)
                    return
                self._enforced[tenant_id] = True
                refusal = error_from_rpc(exc)  # keeps BUDGET_EXCEEDED and its limit/spent metadata
            known = (now, refusal)
            self._known[tenant_id] = known
        if known[1] is not None:
            raise known[1]

    def unanswered(self, tenant_id: str, code: str) -> None:
        """The cost service did not answer: admit, or refuse an enforced budget's tenant when failing closed."""
        if self.fail_closed and self.enforced(tenant_id):
            log.warning("budget check unavailable (%s): refusing a submit of enforced tenant %s", code, tenant_id)
            raise Unavailable(
                "the budget check is unavailable and this tenant's budget is enforced; retry shortly",
                reason="BUDGET_CHECK_UNAVAILABLE",
                metadata={"tenant_id": tenant_id},
            )
        # Cost being down must not stop admission; budgets are re-checked shortly.
        log.warning("budget check unavailable (%s): admitting the submit (budget checks fail open)", code)
