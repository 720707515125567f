"""SendMessageRequest.output_schema: what is a schema the agent can take, and what is refused."""

from __future__ import annotations

import json

import pytest

from atomizerd.errors import InvalidArgument
from atomizerd.sessions.checks import MAX_SCHEMA_BYTES, check_output_schema


def test_no_schema_is_none() -> None:
    assert check_output_schema("") is None


def test_a_schema_comes_back_as_its_object() -> None:
    schema = {
        "type": "object",
        "properties": {
            "loads": {"type": "array", "items": {"type": ["number", "null"]}},
            "kind": {"enum": ["beam", "plate"]},
            "extra": {"anyOf": [{"type": "string"}, True]},
        },
        "required": ["loads"],
        "additionalProperties": False,
    }
    assert check_output_schema(json.dumps(schema)) == schema


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{nope", "not valid JSON"),
        ("[]", "must be a JSON Schema object"),
        ("true", "must be a JSON Schema object"),
        ('{"type": "thing"}', "output_schema.type"),
        ('{"type": []}', "output_schema.type"),
        ('{"required": "x"}', "output_schema.required"),
        ('{"enum": "x"}', "output_schema.enum"),
        ('{"properties": []}', "output_schema.properties"),
        ('{"properties": {"a": 1}}', "output_schema.properties.a"),
        ('{"items": {"type": 5}}', "output_schema.items.type"),
        ('{"anyOf": []}', "output_schema.anyOf"),
        ('{"oneOf": [{"type": "nah"}]}', "output_schema.oneOf[0].type"),
    ],
)
def test_what_is_not_a_schema_is_refused(text: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=None) as caught:
        check_output_schema(text)
    assert says in str(caught.value)


def test_the_size_is_bounded() -> None:
    big = json.dumps({"description": "x" * MAX_SCHEMA_BYTES})
    with pytest.raises(InvalidArgument) as caught:
        check_output_schema(big)
    assert "limit" in str(caught.value)


def test_nesting_is_bounded() -> None:
    schema: dict[str, object] = {"type": "object"}
    for _ in range(40):
        schema = {"items": schema}
    with pytest.raises(InvalidArgument) as caught:
        check_output_schema(json.dumps(schema))
    assert "too deep" in str(caught.value)
