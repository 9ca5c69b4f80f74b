"""Fields a request carries that its message does not define (a newer client, a typo'd field number, a crafted
payload). protobuf keeps them as unknown fields and the server would act as if they had not been sent; the public
API answers 400 naming the first one instead (docs/api.md, "Errors"). REST bodies are checked by Envoy before
transcoding (libs/envoy_fields.py), since transcoding drops unknown JSON keys without a trace.
"""

from __future__ import annotations

from google.protobuf import unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def first_unknown(message: Message, path: str = "") -> str | None:
    """The dotted path of the first unknown field in `message` or a message inside it (`spec.#101`: an unknown
    field has no name, only its number), or None."""
    unknown = unknown_fields.UnknownFieldSet(message)
    if len(unknown):
        return f"{path}#{unknown[0].field_number}"
    for field, value in message.ListFields():
        if field.type != _MESSAGE:
            continue
        name = f"{path}{field.name}"
        assert field.message_type is not None  # a message field
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.type == _MESSAGE:
                for key, item in value.items():
                    found = first_unknown(item, f"{name}[{key}].")
                    if found:
                        return found
        elif field.is_repeated:
            for index, item in enumerate(value):
                found = first_unknown(item, f"{name}[{index}].")
                if found:
                    return found
        else:
            found = first_unknown(value, f"{name}.")
            if found:
                return found
    return None
