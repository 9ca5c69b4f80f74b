"""Budgets in force: the config's, overridden by the admin API's (persisted in etcd); and once-a-month warnings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from libs.config import MeshConfig
from libs.errors import JobMeshError, NotFound
from libs.etcd.client import Compare, RequestOp, TxnResult, WatchEvent, cmp_missing, op_put
from services.cost.budgets import BudgetSetting, from_config
from services.cost.keys import CostKeys


class BudgetKV(Protocol):
    async def put(self, key: str, value: bytes, lease: int = 0) -> int: ...

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[RequestOp], failure: Sequence[RequestOp] = ()
    ) -> TxnResult: ...


class BudgetStore:
    def __init__(self, store: BudgetKV, keys: CostKeys, config: MeshConfig):
        self.store = store
        self.keys = keys
        self.config = config
        self.overrides: dict[str, BudgetSetting] = {}
        self._warned: set[str] = set()

    def on_budget_event(self, event: WatchEvent) -> None:
        tenant_id = event.kv.key.rsplit("/", 1)[-1]
        if event.kind == "delete":
            self.overrides.pop(tenant_id, None)
        else:
            self.overrides[tenant_id] = BudgetSetting.from_json(event.kv.value)

    def require_tenant(self, tenant_id: str) -> None:
        if tenant_id not in self.config.tenants:
            raise NotFound(f"tenant {tenant_id!r} not found", reason="TENANT_NOT_FOUND")

    def setting(self, tenant_id: str) -> BudgetSetting | None:
        """The budget in force: the admin's override if any (a 0 limit removes a configured one), else config's."""
        override = self.overrides.get(tenant_id)
        if override is not None:
            return override if override.active else None
        return from_config(self.config.tenants.get(tenant_id))

    async def update(self, tenant_id: str, setting: BudgetSetting) -> None:
        await self.store.put(self.keys.budget(tenant_id), setting.to_json())
        self.overrides[tenant_id] = setting

    async def first_warning(self, tenant_id: str, month: str, percent: int) -> bool:
        """True exactly once per tenant, month and threshold (across restarts): a create-only marker in etcd."""
        key = self.keys.budget_alert(tenant_id, month, percent)
        if key in self._warned:
            return False
        try:
            result = await self.store.txn([cmp_missing(key)], [op_put(key, b"1")])
        except JobMeshError:
            return False  # tried again next cycle
        self._warned.add(key)
        return result.succeeded
