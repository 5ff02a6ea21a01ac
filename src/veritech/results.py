"""What a function's return value means, by kind (pure; no I/O).

The same code serves every path that produces a value: cyclone applies it to
what the JavaScript runner returned, and the client's literal resolver backend
applies it to a JSON value given directly, so a computed value and a literal
one are checked and mapped identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from veritech.wire import ErrorKind, Kind, ResponseType, failure_body, success_body

QUALIFICATION_RESULTS = ("success", "warning", "failure", "unknown")
ACTION_STATUSES = ("ok", "warning", "error")


@dataclass(frozen=True, slots=True)
class Thrown:
    """The function raised instead of returning."""

    name: str
    message: str


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def outcome_body(
    kind: Kind,
    returned: Any,
    response_type: ResponseType | None = None,
    *,
    thrown: Thrown | None = None,
) -> dict[str, Any]:
    """The ``result`` body (without seq/stats) for a returned value or a throw."""
    if thrown is not None:
        return _thrown_body(kind, thrown)
    try:
        data, unset = _check(kind, returned, response_type)
    except _Invalid as exc:
        return failure_body(ErrorKind.INVALID_RETURN_TYPE, exc.message)
    return success_body(data, unset)


def _thrown_body(kind: Kind, thrown: Thrown) -> dict[str, Any]:
    # An action that throws still ran: it failed in the world, which the
    # protocol reports as a successful execution whose status is "error".
    if kind is Kind.ACTION:
        return success_body({"status": "error", "message": thrown.message}, False)
    return failure_body(ErrorKind.USER_CODE_EXCEPTION, thrown.message, thrown.name)


def _check(
    kind: Kind, value: Any, response_type: ResponseType | None
) -> tuple[Any, bool]:
    if kind is Kind.RESOLVER:
        if value is None:
            return None, True
        _check_response_type(value, response_type or ResponseType.JSON)
        return value, False
    if kind is Kind.QUALIFICATION:
        return _check_qualification(value), False
    if kind is Kind.ACTION:
        return _check_action(value), False
    return _check_validation(value), False


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _check_response_type(value: Any, expected: ResponseType) -> None:
    actual = _type_name(value)
    matches = {
        ResponseType.JSON: True,
        ResponseType.STRING: actual == "string",
        ResponseType.INTEGER: actual == "integer",
        ResponseType.FLOAT: actual in ("integer", "float"),
        ResponseType.BOOLEAN: actual == "boolean",
        ResponseType.OBJECT: actual == "object",
        ResponseType.ARRAY: actual == "array",
    }[expected]
    if not matches:
        raise _Invalid(f"expected a value of type {expected.value}, got {actual}")


def _require_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"{what} must return an object, got {_type_name(value)}")
    return value


def _optional_string(value: dict[str, Any], field: str, what: str) -> None:
    if (
        field in value
        and value[field] is not None
        and not isinstance(value[field], str)
    ):
        got = _type_name(value[field])
        raise _Invalid(f"{what} field {field!r} must be a string, got {got}")


def _check_qualification(value: Any) -> dict[str, Any]:
    what = "a qualification"
    obj = _require_object(value, what)
    result = obj.get("result")
    if result not in QUALIFICATION_RESULTS:
        allowed = ", ".join(QUALIFICATION_RESULTS)
        raise _Invalid(f"{what} field 'result' must be one of {allowed}")
    _optional_string(obj, "message", what)
    if result != "success" and not obj.get("message"):
        raise _Invalid(f"{what} with result {result!r} must carry a 'message'")
    return obj


def _check_action(value: Any) -> dict[str, Any]:
    what = "an action"
    obj = _require_object(value, what)
    if obj.get("status") not in ACTION_STATUSES:
        allowed = ", ".join(ACTION_STATUSES)
        raise _Invalid(f"{what} field 'status' must be one of {allowed}")
    _optional_string(obj, "message", what)
    _optional_string(obj, "resource_id", what)
    return obj


def _check_validation(value: Any) -> dict[str, Any]:
    what = "a validation"
    obj = _require_object(value, what)
    if not isinstance(obj.get("valid"), bool):
        raise _Invalid(f"{what} field 'valid' must be a boolean")
    _optional_string(obj, "message", what)
    return obj
