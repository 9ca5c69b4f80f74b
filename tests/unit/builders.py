"""Small fluent builders shared by the unit tests: mesh configs and job specs, without files or sockets."""

from __future__ import annotations

import copy
import json
from typing import Any

from jobmesh.common.v1 import types_pb2 as t
from libs.config import EdgeLimits, MeshConfig, parse_config
from libs.envoy_config import render_dev_defaults


class ConfigBuilder:
    """A raw mesh config (the dict `parse_config` reads), built up fluently.

    Starts with one static pool `static-general` (2 cores, 2 GiB, class=general) unless pools are added.
    """

    def __init__(self) -> None:
        self._raw: dict[str, Any] = {
            "auth": {"issuer": "jobmesh-test", "audience": "jobmesh"},
            "quota": {"defaults": {"cpu_millis": 64000, "memory_mb": 131072, "concurrent_jobs": 2000}},
            "tenants": {},
            "pools": [],
        }

    def default_quota(self, cpu_millis: int, memory_mb: int, concurrent_jobs: int) -> ConfigBuilder:
        self._raw["quota"]["defaults"] = {
            "cpu_millis": cpu_millis,
            "memory_mb": memory_mb,
            "concurrent_jobs": concurrent_jobs,
        }
        return self

    def tenant(self, tenant_id: str, weight: float = 1.0, **quota: int) -> ConfigBuilder:
        entry: dict[str, Any] = {"weight": weight}
        if quota:
            entry["quota"] = quota
        self._raw["tenants"][tenant_id] = entry
        return self

    def pool(
        self,
        pool_id: str,
        kind: str = "static",
        *,
        cpu: int = 2000,
        mem: int = 2048,
        labels: dict[str, str] | None = None,
        **extra: Any,
    ) -> ConfigBuilder:
        entry: dict[str, Any] = {
            "id": pool_id,
            "kind": kind,
            "worker_cpu_millis": cpu,
            "worker_memory_mb": mem,
            "labels": dict(labels or {}),
        }
        if kind == "static":
            entry["workers"] = extra.pop("workers", 2)
        else:
            entry["min_workers"] = extra.pop("min_workers", 0)
            entry["max_workers"] = extra.pop("max_workers", 4)
        entry.update(extra)
        self._raw["pools"].append(entry)
        return self

    def burst_pool(self, cpu_millis: int, memory_mb: int, concurrent_jobs: int) -> ConfigBuilder:
        self._raw["burst"] = {
            "pool": {"cpu_millis": cpu_millis, "memory_mb": memory_mb, "concurrent_jobs": concurrent_jobs}
        }
        return self

    def raw(self) -> dict[str, Any]:
        raw = copy.deepcopy(self._raw)
        if not raw["pools"]:
            raw["pools"] = [
                {
                    "id": "static-general",
                    "kind": "static",
                    "workers": 2,
                    "worker_cpu_millis": 2000,
                    "worker_memory_mb": 2048,
                    "labels": {"class": "general"},
                }
            ]
        return raw

    def build(self) -> MeshConfig:
        return parse_config(self.raw())


def mixed_pools() -> ConfigBuilder:
    """The usual shape: a small static pool plus a large dynamic one with a different class label."""
    return (
        ConfigBuilder()
        .tenant("acme", 1)
        .tenant("globex", 2)
        .pool("static-general", "static", cpu=2000, mem=2048, labels={"arch": "x86_64", "class": "general"})
        .pool("dynamic-large", "dynamic", cpu=4000, mem=8192, labels={"arch": "x86_64", "class": "large"})
    )


class SpecBuilder:
    """A valid JobSpec (1 core, 256 MB, `echo hi`) to be spoiled one field at a time."""

    def __init__(self) -> None:
        self._spec = t.JobSpec(
            name="job", command=["echo", "hi"], resources=t.Resources(cpu_millis=1000, memory_mb=256)
        )

    def with_(self, **fields: Any) -> SpecBuilder:
        for name, value in fields.items():
            if name in ("env", "required_capabilities"):
                getattr(self._spec, name).update(value)
            elif name in ("command", "retry_on"):
                del getattr(self._spec, name)[:]
                getattr(self._spec, name).extend(value)
            else:
                setattr(self._spec, name, value)
        return self

    def resources(self, cpu_millis: int, memory_mb: int) -> SpecBuilder:
        self._spec.resources.CopyFrom(t.Resources(cpu_millis=cpu_millis, memory_mb=memory_mb))
        return self

    def without_resources(self) -> SpecBuilder:
        self._spec.ClearField("resources")
        return self

    def needs(self, **capabilities: str) -> SpecBuilder:
        self._spec.required_capabilities.update(capabilities)
        return self

    def build(self) -> t.JobSpec:
        spec = t.JobSpec()
        spec.CopyFrom(self._spec)
        return spec


def edge_config(limits: EdgeLimits | None = None, console_port: int | None = None) -> dict[str, Any]:
    """The dev Envoy bootstrap as a dict, with other `limits` or a console port."""
    return json.loads(render_dev_defaults(limits, console_port))  # type: ignore[no-any-return]
