"""Request parsing and JSON decoding: every bad input is one InvalidRequest."""

from __future__ import annotations

from typing import Any

import pytest

from veritech.errors import InvalidRequest
from veritech.wire import (
    Kind,
    ResponseType,
    decode_json,
    parse_kind,
    parse_request,
    salvage_execution_id,
)

GOOD = {"execution_id": "ex-1", "handler": "main", "code": "function main() {}"}


def test_minimal_request_gets_defaults() -> None:
    request = parse_request(GOOD)

    assert (request.execution_id, request.handler, request.code) == (
        "ex-1",
        "main",
        "function main() {}",
    )
    assert request.args is None
    assert request.language == "javascript"
    assert request.timeout_ms is None
    assert request.response_type is None


def test_unknown_fields_are_ignored_and_response_type_is_parsed() -> None:
    request = parse_request(
        {**GOOD, "response_type": "integer", "args": [1, {"a": None}], "extra": 1}
    )

    assert request.response_type is ResponseType.INTEGER
    assert request.args == [1, {"a": None}]


def test_decode_json_reads_an_object() -> None:
    assert decode_json('{"a": "é"}'.encode()) == {"a": "é"}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe{}", "payload is not valid UTF-8: invalid start byte"),
        (b"not json", "payload is not JSON: Expecting value"),
        (b'{"a": 1', "payload is not JSON: Expecting ',' delimiter"),
        (b"", "payload is not JSON: Expecting value"),
        (b'{"a": NaN}', "payload is not JSON: NaN is not a JSON value"),
    ],
    ids=["bad-utf8", "not-json", "truncated", "empty", "nan"],
)
def test_decode_json_refuses(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        decode_json(payload)

    assert raised.value.message == message


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([1, 2], "request must be a JSON object, not array"),
        ("text", "request must be a JSON object, not string"),
        (None, "request must be a JSON object, not null"),
    ],
)
def test_non_object_request_is_refused(document: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_request(document)

    assert raised.value.message == message
    assert raised.value.execution_id is None


@pytest.mark.parametrize("missing", ["execution_id", "handler", "code"])
def test_missing_required_field_is_named(missing: str) -> None:
    document = {k: v for k, v in GOOD.items() if k != missing}

    with pytest.raises(InvalidRequest) as raised:
        parse_request(document)

    assert raised.value.message == f"invalid request: {missing}: field required"


def test_every_problem_is_listed_and_a_valid_execution_id_is_kept() -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_request({"execution_id": "keep-me", "handler": 3})

    assert raised.value.message == (
        "invalid request: handler: Input should be a valid string; code: field required"
    )
    assert raised.value.execution_id == "keep-me"


@pytest.mark.parametrize(
    "execution_id", ["", "has space", "x" * 129, "slash/no", "ünïcode"]
)
def test_bad_execution_id_is_refused_and_not_echoed(execution_id: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_request({**GOOD, "execution_id": execution_id})

    assert raised.value.message.startswith("invalid request: execution_id: ")
    assert "String should match pattern" in raised.value.message
    assert raised.value.execution_id == ""


def test_execution_id_of_128_allowed_characters_is_accepted() -> None:
    execution_id = ("aZ0._:-" * 19)[:128]

    assert parse_request({**GOOD, "execution_id": execution_id}).execution_id == (
        execution_id
    )


def test_execution_id_must_be_a_string() -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_request({**GOOD, "execution_id": 12})

    assert raised.value.message == (
        "invalid request: execution_id: Input should be a valid string"
    )


def test_bad_response_type_lists_the_allowed_ones() -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_request({**GOOD, "response_type": "number"})

    assert raised.value.message == (
        "invalid request: response_type: Value error, must be one of string, "
        "integer, float, boolean, object, array, json"
    )
    assert raised.value.execution_id == "ex-1"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("timeout_ms", 0, "timeout_ms: Input should be greater than 0"),
        ("timeout_ms", "100", "timeout_ms: Input should be a valid integer"),
        ("code", "", "code: String should have at least 1 character"),
        ("handler", "1abc", "handler: String should match pattern"),
    ],
)
def test_field_rules(field: str, value: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_request({**GOOD, field: value})

    assert raised.value.message.startswith(f"invalid request: {message}")


def test_request_nested_too_deeply_is_refused() -> None:
    args: Any = 1
    for _ in range(300):
        args = [args]

    with pytest.raises(InvalidRequest) as raised:
        parse_request({**GOOD, "args": args})

    assert raised.value.message == "request is nested more than 200 levels deep"
    assert raised.value.execution_id == "ex-1"


def test_kinds() -> None:
    assert [parse_kind(k.value) for k in Kind] == list(Kind)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_kind("job")

    assert raised.value.message == (
        "unknown kind 'job': expected one of resolver, qualification, action, "
        "validation"
    )


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"execution_id": "ok-1"}, "ok-1"),
        ({"execution_id": "bad id"}, ""),
        ({"execution_id": 5}, ""),
        ([], ""),
        (None, ""),
    ],
)
def test_salvage_execution_id(document: Any, expected: str) -> None:
    assert salvage_execution_id(document) == expected


def test_out_of_range_number_is_refused() -> None:
    with pytest.raises(InvalidRequest) as raised:
        decode_json(b'{"args": 1e999}')
    assert raised.value.message == "payload is not JSON: 1e999 is out of range"
