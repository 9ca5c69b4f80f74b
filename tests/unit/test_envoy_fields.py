"""The edge's unknown-field check: which routes it guards and the field tree it walks (rendered from the protos)."""

from __future__ import annotations

import re

from jobmesh.gateway.v1 import gateway_pb2
from libs.envoy_config import PUBLIC_SERVICES
from libs.envoy_fields import _lua_pattern, body_routes, render_lua


def lua_pattern_as_regex(pattern: str) -> str:
    return pattern.replace("%", "\\")


def test_every_rest_write_with_a_body_is_guarded_and_no_read() -> None:
    routes = {(r.method, r.message) for r, _ in body_routes((gateway_pb2.DESCRIPTOR,), PUBLIC_SERVICES)}

    assert ("POST", "jobmesh.common.v1.JobSpec") in routes  # body: "spec" -> the spec itself
    assert ("PUT", "jobmesh.gateway.v1.UpdateQuotaRequest") in routes
    assert all(method in ("POST", "PUT", "PATCH") for method, _ in routes)


def test_path_templates_become_anchored_patterns_that_match_one_segment_per_variable() -> None:
    pattern = lua_pattern_as_regex(_lua_pattern("/api/v1/jobs/{job_id}:cancel"))

    assert re.fullmatch(pattern, "/api/v1/jobs/01abc:cancel")
    assert not re.fullmatch(pattern, "/api/v1/jobs/a/b:cancel")
    assert not re.fullmatch(pattern, "/api/v1/jobs/01abc")


def test_the_field_tree_knows_both_json_spellings_and_leaves_maps_and_timestamps_open() -> None:
    lua = render_lua((gateway_pb2.DESCRIPTOR,), PUBLIC_SERVICES)

    assert '["max_runtime_seconds"]=false' in lua and '["maxRuntimeSeconds"]=false' in lua
    assert '["env"]=false' in lua  # a map of strings: any key
    assert '["deadline"]=false' in lua  # a Timestamp is a string in JSON
    assert re.search(r'\["resources"\]=N\[\d+\]', lua)  # a message: walked into
