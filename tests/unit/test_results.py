"""What a returned value means, for every kind and response type."""

from __future__ import annotations

from typing import Any

import pytest

from veritech.results import Thrown, outcome_body
from veritech.wire import Kind, ResponseType


def success(data: Any, unset: bool = False) -> dict[str, Any]:
    return {"type": "result", "status": "success", "data": data, "unset": unset}


def invalid(message: str) -> dict[str, Any]:
    return {
        "type": "result",
        "status": "failure",
        "error": {"kind": "invalid_return_type", "message": message},
    }


# value, and the type name the checks give it
VALUES: list[tuple[Any, str]] = [
    ("text", "string"),
    (7, "integer"),
    (0, "integer"),
    (1.5, "float"),
    (True, "boolean"),
    (False, "boolean"),
    ({"a": 1}, "object"),
    ([1, 2], "array"),
]
ACCEPTS = {
    ResponseType.STRING: {"string"},
    ResponseType.INTEGER: {"integer"},
    ResponseType.FLOAT: {"float", "integer"},
    ResponseType.BOOLEAN: {"boolean"},
    ResponseType.OBJECT: {"object"},
    ResponseType.ARRAY: {"array"},
    ResponseType.JSON: {"string", "integer", "float", "boolean", "object", "array"},
}


@pytest.mark.parametrize("response_type", list(ResponseType))
@pytest.mark.parametrize(("value", "type_name"), VALUES)
def test_resolver_response_types(
    response_type: ResponseType, value: Any, type_name: str
) -> None:
    body = outcome_body(Kind.RESOLVER, value, response_type)

    if type_name in ACCEPTS[response_type]:
        assert body == success(value)
    else:
        assert body == invalid(
            f"expected a value of type {response_type.value}, got {type_name}"
        )


def test_boolean_is_not_an_integer_and_integer_is_not_a_boolean() -> None:
    assert outcome_body(Kind.RESOLVER, True, ResponseType.INTEGER) == invalid(
        "expected a value of type integer, got boolean"
    )
    assert outcome_body(Kind.RESOLVER, 1, ResponseType.BOOLEAN) == invalid(
        "expected a value of type boolean, got integer"
    )
    assert outcome_body(Kind.RESOLVER, True, ResponseType.FLOAT) == invalid(
        "expected a value of type float, got boolean"
    )


def test_float_is_not_an_integer_but_an_integer_is_a_float() -> None:
    assert outcome_body(Kind.RESOLVER, 2.5, ResponseType.INTEGER) == invalid(
        "expected a value of type integer, got float"
    )
    assert outcome_body(Kind.RESOLVER, 2, ResponseType.FLOAT) == success(2)


@pytest.mark.parametrize("response_type", [None, *ResponseType])
def test_resolver_null_is_unset_whatever_the_type(
    response_type: ResponseType | None,
) -> None:
    assert outcome_body(Kind.RESOLVER, None, response_type) == success(None, True)


def test_resolver_without_response_type_takes_any_json() -> None:
    assert outcome_body(Kind.RESOLVER, [{"x": None}]) == success([{"x": None}])


@pytest.mark.parametrize("result", ["success", "warning", "failure", "unknown"])
def test_qualification_results_with_message(result: str) -> None:
    value = {"result": result, "message": "because"}

    assert outcome_body(Kind.QUALIFICATION, value) == success(value)


def test_qualification_success_needs_no_message() -> None:
    assert outcome_body(Kind.QUALIFICATION, {"result": "success"}) == success(
        {"result": "success"}
    )


@pytest.mark.parametrize("result", ["warning", "failure", "unknown"])
@pytest.mark.parametrize("message", [None, ""], ids=["absent", "empty"])
def test_qualification_other_than_success_needs_a_message(
    result: str, message: str | None
) -> None:
    value: dict[str, Any] = {"result": result}
    if message is not None:
        value["message"] = message

    assert outcome_body(Kind.QUALIFICATION, value) == invalid(
        f"a qualification with result {result!r} must carry a 'message'"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"result": "ok"},
            "a qualification field 'result' must be one of success, warning, "
            "failure, unknown",
        ),
        (
            {},
            "a qualification field 'result' must be one of success, warning, "
            "failure, unknown",
        ),
        ("success", "a qualification must return an object, got string"),
        (None, "a qualification must return an object, got null"),
        (
            {"result": "failure", "message": 3},
            "a qualification field 'message' must be a string, got integer",
        ),
    ],
)
def test_qualification_shape_errors(value: Any, message: str) -> None:
    assert outcome_body(Kind.QUALIFICATION, value) == invalid(message)


@pytest.mark.parametrize("status", ["ok", "warning", "error"])
def test_action_statuses(status: str) -> None:
    value = {"status": status, "payload": {"n": 1}, "message": "m", "resource_id": "r"}

    assert outcome_body(Kind.ACTION, value) == success(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"status": "done"},
            "an action field 'status' must be one of ok, warning, error",
        ),
        ([], "an action must return an object, got array"),
        (
            {"status": "ok", "resource_id": 5},
            "an action field 'resource_id' must be a string, got integer",
        ),
        (
            {"status": "ok", "message": False},
            "an action field 'message' must be a string, got boolean",
        ),
    ],
)
def test_action_shape_errors(value: Any, message: str) -> None:
    assert outcome_body(Kind.ACTION, value) == invalid(message)


def test_action_that_throws_is_a_success_with_status_error() -> None:
    body = outcome_body(Kind.ACTION, None, thrown=Thrown("Error", "API down"))

    assert body == success({"status": "error", "message": "API down"})


@pytest.mark.parametrize("kind", [Kind.RESOLVER, Kind.QUALIFICATION, Kind.VALIDATION])
def test_other_kinds_that_throw_are_user_code_exceptions(kind: Kind) -> None:
    body = outcome_body(kind, None, thrown=Thrown("TypeError", "x is undefined"))

    assert body == {
        "type": "result",
        "status": "failure",
        "error": {
            "kind": "user_code_exception",
            "message": "x is undefined",
            "name": "TypeError",
        },
    }


@pytest.mark.parametrize(
    "value", [{"valid": True}, {"valid": False, "message": "too long"}]
)
def test_validation_results(value: dict[str, Any]) -> None:
    assert outcome_body(Kind.VALIDATION, value) == success(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"valid": "yes"}, "a validation field 'valid' must be a boolean"),
        ({"valid": 1}, "a validation field 'valid' must be a boolean"),
        ({}, "a validation field 'valid' must be a boolean"),
        (True, "a validation must return an object, got boolean"),
        (
            {"valid": False, "message": ["a"]},
            "a validation field 'message' must be a string, got array",
        ),
    ],
)
def test_validation_shape_errors(value: Any, message: str) -> None:
    assert outcome_body(Kind.VALIDATION, value) == invalid(message)
