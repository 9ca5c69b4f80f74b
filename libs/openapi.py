"""The OpenAPI 3 document of the public REST API, generated from the protos' HTTP bindings.

Read from the descriptor set `make proto` builds (with source info, so that proto comments become descriptions):
every method of the public services with a `google.api.http` rule is one operation; path variables become path
parameters, the other fields of a GET's request query parameters, and the body is the request (`body: "*"`) or
the named field. JSON follows the transcoder's settings (proto field names, enums by name, 64-bit integers as
strings). Written to docs/openapi.yaml by `make openapi`, checked against the protos by the tests, and served by
the gateway at /api/v1/openapi.yaml.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from libs.envoy_config import PUBLIC_SERVICES

REPO = Path(__file__).resolve().parent.parent
DESCRIPTORS = REPO / "build" / "jobmesh.pb"
DOCUMENT = REPO / "docs" / "openapi.yaml"
VERSION = "v1"

F = descriptor_pb2.FieldDescriptorProto
_SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_INT64: {"type": "string", "format": "int64"},
    F.TYPE_UINT64: {"type": "string", "format": "uint64"},
    F.TYPE_SINT64: {"type": "string", "format": "int64"},
    F.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    F.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int64"},
    F.TYPE_FIXED32: {"type": "integer", "format": "int64"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte"},
}
# Well-known types in their JSON form.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {"type": "string", "example": "1.5s"},
    ".google.protobuf.Any": {"type": "object", "additionalProperties": True},
    ".google.protobuf.Struct": {"type": "object", "additionalProperties": True},
}
_HTTP_BODY = ".google.api.HttpBody"
_STATUS_SCHEMA = {
    "type": "object",
    "description": "A google.rpc.Status; its details hold a google.rpc.ErrorInfo with the stable `reason` (see "
    "docs/api.md, Errors) and metadata.",
    "properties": {
        "code": {"type": "integer", "format": "int32", "description": "The google.rpc.Code."},
        "message": {"type": "string"},
        "details": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "@type": {"type": "string", "example": "type.googleapis.com/google.rpc.ErrorInfo"},
                    "reason": {"type": "string", "example": "QUOTA_EXCEEDED"},
                    "domain": {"type": "string", "example": "jobmesh.dev"},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                },
                "additionalProperties": True,
            },
        },
    },
}


class _Protos:
    """The descriptor set, indexed: messages and enums by full name, comments by (file, location path)."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet):
        self.files = list(files.file)
        self.messages: dict[str, tuple[descriptor_pb2.DescriptorProto, str, tuple[int, ...]]] = {}
        self.enums: dict[str, tuple[descriptor_pb2.EnumDescriptorProto, str, tuple[int, ...]]] = {}
        self.comments: dict[tuple[str, tuple[int, ...]], str] = {}
        for f in self.files:
            for loc in f.source_code_info.location:
                text = " ".join(line.strip() for line in loc.leading_comments.strip().splitlines())
                if text:
                    self.comments[(f.name, tuple(loc.path))] = text
            prefix = f".{f.package}" if f.package else ""
            for i, m in enumerate(f.message_type):
                self._index(m, prefix, f.name, (4, i))
            for i, e in enumerate(f.enum_type):
                self.enums[f"{prefix}.{e.name}"] = (e, f.name, (5, i))

    def _index(self, m: descriptor_pb2.DescriptorProto, prefix: str, file: str, path: tuple[int, ...]) -> None:
        name = f"{prefix}.{m.name}"
        self.messages[name] = (m, file, path)
        for i, nested in enumerate(m.nested_type):
            self._index(nested, name, file, (*path, 3, i))
        for i, e in enumerate(m.enum_type):
            self.enums[f"{name}.{e.name}"] = (e, file, (*path, 4, i))

    def comment(self, file: str, path: tuple[int, ...]) -> str:
        return self.comments.get((file, path), "")


def _schema_name(full_name: str) -> str:
    """`.jobmesh.common.v1.Job` -> `jobmesh.common.v1.Job` (unique, and readable in tools)."""
    return full_name.lstrip(".")


class _Builder:
    def __init__(self, protos: _Protos):
        self.p = protos
        self.schemas: dict[str, Any] = {}

    def ref(self, type_name: str) -> dict[str, Any]:
        if type_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[type_name])
        if type_name in self.p.enums:
            self._enum(type_name)
        else:
            self._message(type_name)
        return {"$ref": f"#/components/schemas/{_schema_name(type_name)}"}

    def _enum(self, type_name: str) -> None:
        name = _schema_name(type_name)
        if name in self.schemas:
            return
        enum, file, path = self.p.enums[type_name]
        schema: dict[str, Any] = {"type": "string", "enum": [v.name for v in enum.value]}
        if text := self.p.comment(file, path):
            schema["description"] = text
        self.schemas[name] = schema

    def _message(self, type_name: str) -> None:
        name = _schema_name(type_name)
        if name in self.schemas:
            return
        message, file, path = self.p.messages[type_name]
        schema: dict[str, Any] = {"type": "object", "properties": {}}
        self.schemas[name] = schema  # before the fields: a message may refer to itself
        if text := self.p.comment(file, path):
            schema["description"] = text
        for i, field in enumerate(message.field):
            prop = self.field(field, type_name)
            if text := self.p.comment(file, (*path, 2, i)):
                prop = {"description": text, **prop} if "$ref" not in prop else {"description": text, "allOf": [prop]}
            schema["properties"][field.name] = prop

    def field(self, field: descriptor_pb2.FieldDescriptorProto, owner: str) -> dict[str, Any]:
        if field.type == F.TYPE_MESSAGE:
            entry = self.p.messages.get(field.type_name)
            if entry is not None and entry[0].options.map_entry:
                value = entry[0].field[1]
                return {"type": "object", "additionalProperties": self.field(value, field.type_name)}
            single = self.ref(field.type_name)
        elif field.type == F.TYPE_ENUM:
            single = self.ref(field.type_name)
        else:
            single = dict(_SCALARS[field.type])
        if field.label == F.LABEL_REPEATED:
            return {"type": "array", "items": single}
        return single


def _rule(method: descriptor_pb2.MethodDescriptorProto) -> http_pb2.HttpRule | None:
    if not method.options.HasExtension(annotations_pb2.http):
        return None
    return method.options.Extensions[annotations_pb2.http]


def _verb_and_path(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind == "custom":
        return rule.custom.kind.lower(), rule.custom.path
    return str(kind), str(getattr(rule, str(kind)))


def _operation(
    b: _Builder, service: str, method: descriptor_pb2.MethodDescriptorProto, file: str, path: tuple[int, ...]
) -> tuple[str, str, dict[str, Any]]:
    rule = _rule(method)
    assert rule is not None
    verb, template = _verb_and_path(rule)
    variables = re.findall(r"{([a-z_][a-z0-9_.]*)(?:=[^}]*)?}", template)
    oas_path = re.sub(r"{([a-z_][a-z0-9_.]*)=[^}]*}", r"{\1}", template)
    request, _, _ = b.p.messages[method.input_type]
    short = service.rsplit(".", 1)[-1]
    op: dict[str, Any] = {
        "operationId": f"{short}_{method.name}",
        "tags": [short],
        "summary": method.name,
    }
    if text := b.p.comment(file, path):
        op["description"] = text
    params: list[dict[str, Any]] = []
    fields = {f.name: (i, f) for i, f in enumerate(request.field)}
    _, req_file, req_path = b.p.messages[method.input_type]
    for var in variables:
        index, field = fields[var]
        param = {"name": var, "in": "path", "required": True, "schema": b.field(field, method.input_type)}
        if text := b.p.comment(req_file, (*req_path, 2, index)):
            param["description"] = text
        params.append(param)
    body = rule.body
    if not body:
        for name, (index, field) in fields.items():
            if name in variables or field.type == F.TYPE_MESSAGE:
                continue
            param = {"name": name, "in": "query", "required": False, "schema": b.field(field, method.input_type)}
            if text := b.p.comment(req_file, (*req_path, 2, index)):
                param["description"] = text
            params.append(param)
    if params:
        op["parameters"] = params
    if body == "*":
        props = {
            name: b.field(field, method.input_type) for name, (_, field) in fields.items() if name not in variables
        }
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "properties": props}}},
        }
    elif body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": b.field(fields[body][1], method.input_type)}},
        }
    if method.output_type == _HTTP_BODY:
        media = "text/plain"
        content = {media: {"schema": {"type": "string"}}}
        ok = "The text, as written" + (" (streamed)" if method.server_streaming else "")
    elif method.server_streaming:
        content = {"application/x-ndjson": {"schema": b.ref(method.output_type)}}
        ok = "A stream of JSON objects, one per line"
    else:
        content = {"application/json": {"schema": b.ref(method.output_type)}}
        ok = "OK"
    op["responses"] = {
        "200": {"description": ok, "content": content},
        "default": {
            "description": "An error (see docs/api.md, Errors)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}},
        },
    }
    if service.endswith(".ApiService"):
        op["security"] = []  # the document itself needs no token
    return oas_path, verb, op


def build(descriptors: bytes) -> dict[str, Any]:
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptors)
    protos = _Protos(files)
    b = _Builder(protos)
    paths: dict[str, dict[str, Any]] = {}
    tags = []
    for f in protos.files:
        for si, service in enumerate(f.service):
            full = f"{f.package}.{service.name}"
            if full not in PUBLIC_SERVICES:
                continue
            tag = {"name": service.name}
            if text := protos.comment(f.name, (6, si)):
                tag["description"] = text
            tags.append(tag)
            for mi, method in enumerate(service.method):
                if _rule(method) is None:
                    continue
                path, verb, op = _operation(b, full, method, f.name, (6, si, 2, mi))
                paths.setdefault(path, {})[verb] = op
    b.schemas["google.rpc.Status"] = _STATUS_SCHEMA
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "jobmesh API",
            "version": VERSION,
            "description": "The public REST API of jobmesh, generated from protos/jobmesh/gateway/v1/gateway.proto "
            "(the same methods are served as native gRPC on the same port). Every call but this document needs "
            "`Authorization: Bearer <JWT>`. Reference: docs/api.md.",
        },
        "servers": [{"url": "http://127.0.0.1:8080", "description": "the dev stack (make run)"}],
        "security": [{"bearerAuth": []}],
        "tags": tags,
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": dict(sorted(b.schemas.items())),
        },
    }


def render(descriptors: bytes) -> str:
    header = "# Generated from the protos by `make openapi` (libs/openapi.py); do not edit.\n"
    return header + yaml.safe_dump(build(descriptors), sort_keys=False, width=120, allow_unicode=True)


if __name__ == "__main__":
    text = render(DESCRIPTORS.read_bytes())
    if sys.argv[1:] == ["--check"]:
        raise SystemExit(0 if DOCUMENT.read_text() == text else "docs/openapi.yaml is stale: run `make openapi`")
    DOCUMENT.write_text(text)
