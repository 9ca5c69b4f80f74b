"""Unknown fields in a request: found wherever they hide, named by path and number."""

from __future__ import annotations

from google.protobuf.message import Message

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.gateway.v1 import gateway_pb2 as g
from libs.unknown_fields import first_unknown

# Field 101 as a varint (tag 101 << 3 | 0 = 808 = 0xa8 0x06), value 5: what a newer client or a crafted payload sends.
FIELD_101 = b"\xa8\x06\x05"


def reparsed(message: Message) -> Message:
    copy = type(message)()
    copy.ParseFromString(message.SerializeToString())
    return copy


def with_unknown(message: Message) -> Message:
    copy = type(message)()
    copy.ParseFromString(message.SerializeToString() + FIELD_101)
    return copy


def test_a_well_formed_request_has_none() -> None:
    spec = t.JobSpec(name="x", command=["true"], resources=t.Resources(cpu_millis=1, memory_mb=1), env={"A": "1"})

    assert first_unknown(reparsed(g.SubmitJobRequest(spec=spec))) is None


def test_an_unknown_field_at_the_top_is_named_by_number() -> None:
    assert first_unknown(with_unknown(g.SubmitJobRequest())) == "#101"


def test_an_unknown_field_inside_a_nested_message_is_named_by_its_path() -> None:
    resources = with_unknown(t.Resources(cpu_millis=1))
    request = reparsed(g.SubmitJobRequest(spec=t.JobSpec(name="x", resources=resources)))  # type: ignore[arg-type]

    assert first_unknown(request) == "spec.resources.#101"


def test_scalar_maps_and_lists_are_not_messages_to_look_into() -> None:
    spec = t.JobSpec(command=["a", "b"], env={"K": "V"}, required_capabilities={"gpu": "1"})

    assert first_unknown(reparsed(spec)) is None


def test_an_unknown_field_in_a_list_of_messages_is_named_by_its_index() -> None:
    job = reparsed(t.Job(attempts=[t.AttemptRecord(), with_unknown(t.AttemptRecord())]))  # type: ignore[list-item]

    assert first_unknown(job) == "attempts[1].#101"
