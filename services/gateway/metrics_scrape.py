"""Collects every service's /metrics into one exposition, each sample labelled with where it came from."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


async def scrape_all(targets: tuple[str, ...], own: str, timeout: float = 2.0, own_address: str = "") -> str:
    """Merges families by name (one HELP/TYPE each) and adds an `instance` label to every sample: the target's
    address, and for this gateway's own samples (`own`) "gateway", or `own_address` (where they are served) when it
    is one of the targets: then every gateway of several labels every process alike, itself included."""
    own_instance = own_address if own_address in targets else "gateway"
    targets = tuple(t for t in targets if t != own_instance)
    async with httpx.AsyncClient(timeout=timeout) as client:

        async def one(target: str) -> tuple[str, str]:
            try:
                resp = await client.get(f"http://{target}/metrics")
                resp.raise_for_status()
                return target, resp.text
            except httpx.HTTPError:
                return target, ""

        bodies = await asyncio.gather(*(one(t) for t in targets))
    families: dict[str, tuple[str, str, list[str]]] = {}
    up: list[tuple[str, int]] = []
    for instance, text in [(own_instance, own), *bodies]:
        up.append((instance, 1 if text else 0))
        for family in text_string_to_metric_families(text):
            entry = families.setdefault(family.name, (family.type, family.documentation, []))
            for sample in family.samples:
                labels = {**sample.labels, "instance": instance}
                rendered = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
                entry[2].append(f"{sample.name}{{{rendered}}} {sample.value}")
    lines = ["# HELP jobmesh_up 1 if the service's metrics endpoint answered.", "# TYPE jobmesh_up gauge"]
    lines += [f'jobmesh_up{{instance="{_escape(i)}"}} {v}' for i, v in up]
    for name, (kind, doc, samples) in families.items():
        # The parser names a counter family without its `_total`; text format 0.0.4 wants the sample name back.
        header = f"{name}_total" if kind == "counter" and not name.endswith("_total") else name
        lines.append(f"# HELP {header} {doc}")
        lines.append(f"# TYPE {header} {'untyped' if kind == 'unknown' else kind}")
        lines.extend(samples)
    return "\n".join(lines) + "\n"
