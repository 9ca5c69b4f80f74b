"""Unknown JSON fields in REST bodies, refused at the edge before transcoding.

Envoy's gRPC-JSON transcoder drops a JSON key its message does not define, so `"max_runtime_second": 5` (one
letter short) would run the job without a limit and answer 200. The contract says an unknown field is a 400
naming it. A small Lua filter, placed before the transcoder, walks the body of each REST write with the field
tree of that route's message (rendered here from the protos' descriptors and their HTTP bindings) and answers
400 `UNKNOWN_FIELD` with the field's path. Map keys (env, labels) and free-form values are not checked;
malformed JSON is left to the transcoder, which reports it. Native gRPC requests are checked by the gateway
(libs/unknown_fields.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from google.api import annotations_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor

# Values the JSON mapping writes as something other than an object of fields: not walked into.
_OPAQUE = {
    "google.protobuf.Any",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
    "google.protobuf.Empty",
    *(f"google.protobuf.{w}Value" for w in ("Bool", "Int32", "Int64", "UInt32", "UInt64", "Float", "Double")),
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
}
METADATA_NAMESPACE = "jobmesh.edge"
METADATA_KEY = "unknown_field"
MAX_DEPTH = 32  # deeper JSON is left to the transcoder (its own limit answers it)
WRITE_METHODS = ("post", "put", "patch")


@dataclass(frozen=True)
class Route:
    method: str  # upper case
    pattern: str  # a Lua pattern over the path, without the query
    message: str  # full name of the message the body fills


def _lua_pattern(template: str) -> str:
    """/api/v1/tenants/{tenant_id}/quotas -> ^/api/v1/tenants/[^/]+/quotas$ (verbs like :cancel kept)."""
    out = []
    for part in re.split(r"(\{[^}]+\})", template):
        if part.startswith("{"):
            out.append("[^/:]+")
        else:
            out.append(re.sub(r"([^\w/])", r"%\1", part))
    return "^" + "".join(out) + "$"


def body_routes(files: tuple[FileDescriptor, ...], services: tuple[str, ...]) -> list[tuple[Route, Descriptor]]:
    """Each REST write of the given services: its method, path pattern and the message its body fills."""
    routes = []
    for file in files:
        for service in file.services_by_name.values():
            if service.full_name not in services:
                continue
            for method in service.methods:
                rule = method.GetOptions().Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                if verb not in WRITE_METHODS or not rule.body:
                    continue
                body = method.input_type
                if rule.body != "*":
                    named = body.fields_by_name[rule.body].message_type
                    assert named is not None, f"{method.full_name}: body {rule.body} is not a message"
                    body = named
                routes.append((Route(verb.upper(), _lua_pattern(getattr(rule, verb)), body.full_name), body))
    return routes


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


class _Nodes:
    """Lua tables, one per message type (so recursive types are fine): {f = {json key = child}} for a message,
    {m = child} for a map whose values are messages; `false` for anything not walked into."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.bodies: list[str] = []

    def ref(self, message: Descriptor) -> str:
        if message.full_name in _OPAQUE:
            return "false"
        if message.full_name not in self.index:
            self.index[message.full_name] = len(self.bodies)
            self.bodies.append("")
            entries = []
            for field in message.fields:
                child = self._child(field)
                for key in dict.fromkeys((field.name, field.json_name)):
                    entries.append(f"[{_lua_string(key)}]={child}")
            self.bodies[self.index[message.full_name]] = "{" + ",".join(entries) + "}"
        return f"N[{self.index[message.full_name] + 1}]"

    def _child(self, field: FieldDescriptor) -> str:
        if _is_map(field):
            assert field.message_type is not None
            value = field.message_type.fields_by_name["value"]
            return "false" if value.message_type is None else f"{{m={self.ref(value.message_type)}}}"
        if field.message_type is None:
            return "false"
        return self.ref(field.message_type)


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_lua(files: tuple[FileDescriptor, ...], services: tuple[str, ...]) -> str:
    nodes = _Nodes()
    route_lines = []
    for route, message in body_routes(files, services):
        route_lines.append(f"  {{{_lua_string(route.method)}, {_lua_string(route.pattern)}, {nodes.ref(message)}}},")
    # Fill the tables after declaring them all, so a node may name one declared later (or itself).
    fills = [f"N[{i + 1}].f = {body}" for i, body in enumerate(nodes.bodies)]
    declare = f"local N = {{}}\nfor i = 1, {len(nodes.bodies)} do N[i] = {{}} end"
    return "\n".join([declare, *fills, "local ROUTES = {", *route_lines, "}", _LUA_WALKER])


# The walker: returns the next index after a JSON value, or nil (malformed: left to the transcoder) or
# nil plus the path of the first key the node does not define.
_LUA_WALKER = r"""
local byte, find, sub, gsub = string.byte, string.find, string.sub, string.gsub
local MAX_DEPTH = __MAX_DEPTH__

local function ws(s, i)
  local _, e = find(s, "^[ \t\r\n]*", i)
  return e + 1
end

local function str(s, i)
  local j, escaped = i + 1, false
  while true do
    local q = find(s, '["\\]', j)
    if not q then return nil end
    if byte(s, q) == 34 then return sub(s, i + 1, q - 1), q + 1, escaped end
    escaped = true
    j = q + 2
  end
end

local function unescape(key)
  key = gsub(key, "\\u00(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
  return (gsub(key, "\\(.)", "%1"))
end

local value
value = function(s, i, node, path, depth)
  if depth > MAX_DEPTH then return nil end
  i = ws(s, i)
  local c = byte(s, i)
  if c == 123 then
    i = ws(s, i + 1)
    if byte(s, i) == 125 then return i + 1 end
    while true do
      if byte(s, i) ~= 34 then return nil end
      local key, after, escaped = str(s, i)
      if not key then return nil end
      if escaped then key = unescape(key) end
      local child = false
      if node then
        if node.m ~= nil then child = node.m else
          child = node.f[key]
          if child == nil then return nil, path .. key end
        end
      end
      i = ws(s, after)
      if byte(s, i) ~= 58 then return nil end
      local err
      i, err = value(s, i + 1, child, path .. key .. ".", depth + 1)
      if not i then return nil, err end
      i = ws(s, i)
      c = byte(s, i)
      if c == 44 then i = ws(s, i + 1) elseif c == 125 then return i + 1 else return nil end
    end
  elseif c == 91 then
    i = ws(s, i + 1)
    if byte(s, i) == 93 then return i + 1 end
    while true do
      local err
      i, err = value(s, i, node, path, depth + 1)
      if not i then return nil, err end
      i = ws(s, i)
      c = byte(s, i)
      if c == 44 then i = i + 1 elseif c == 93 then return i + 1 else return nil end
    end
  elseif c == 34 then
    local _, after = str(s, i)
    return after
  end
  local _, e = find(s, "^[%w%.%+%-]+", i)
  if not e then return nil end
  return e + 1
end


function envoy_on_request(handle)
  local headers = handle:headers()
  local ctype = headers:get("content-type") or ""
  if find(ctype, "^application/grpc") then return end
  local method = headers:get(":method")
  local path = headers:get(":path") or ""
  path = sub(path, 1, (find(path, "?", 1, true) or 0) - 1)
  for _, route in ipairs(ROUTES) do
    if method == route[1] and find(path, route[2]) then
      local body = handle:body()
      if body == nil then return end
      local s = body:getBytes(0, body:length())
      local _, unknown = value(s, 1, route[3], "", 0)
      if unknown then
        -- Envoy's JSON body format escapes it; only its length is ours to bound.
        local field = sub(unknown, 1, 200)
        handle:streamInfo():dynamicMetadata():set("__NAMESPACE__", "__KEY__", field)
        handle:respond({[":status"] = "400"}, field .. ": unknown field (not part of this API)")
      end
      return
    end
  end
end
"""
_LUA_WALKER = (
    _LUA_WALKER.replace("__MAX_DEPTH__", str(MAX_DEPTH))
    .replace("__NAMESPACE__", METADATA_NAMESPACE)
    .replace("__KEY__", METADATA_KEY)
)


def lua_filter(files: tuple[FileDescriptor, ...], services: tuple[str, ...]) -> dict[str, object]:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": render_lua(files, services)},
        },
    }


def local_reply_mapper(rest_caller: dict[str, object], domain: str) -> dict[str, object]:
    """The REST error body for the filter's 400: reason UNKNOWN_FIELD and the field in its metadata, as the
    gateway answers a gRPC request with an unknown field."""
    return {
        "filter": {
            "and_filter": {
                "filters": [
                    {
                        "metadata_filter": {
                            "matcher": {
                                "filter": METADATA_NAMESPACE,
                                "path": [{"key": METADATA_KEY}],
                                "value": {"present_match": True},
                            },
                            # Unset, a filter on metadata matches when the key is missing.
                            "match_if_key_not_found": False,
                        }
                    },
                    rest_caller,
                ]
            }
        },
        "body_format_override": {
            "json_format": {
                "code": 3,
                "message": "%LOCAL_REPLY_BODY%",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "UNKNOWN_FIELD",
                        "domain": domain,
                        "metadata": {"field": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{METADATA_KEY})%"},
                    }
                ],
            },
            "content_type": "application/json",
        },
    }
