"""The wire types: requests, reply messages and error kinds (docs/protocol.md).

Parsing never raises anything but InvalidRequest, so that every malformed
request can still be answered with a ``result`` of kind ``invalid_request``.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from veritech.errors import InvalidRequest

EXECUTION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
HANDLER_PATTERN = r"^[A-Za-z_$][A-Za-z0-9_$]{0,255}$"
_EXECUTION_ID_RE = re.compile(EXECUTION_ID_PATTERN)
# Deepest nesting of arrays and objects a request may hold. Deeper values
# cannot be carried through every hop: pydantic refuses to serialize past 255
# levels, and Python's JSON codec past its recursion limit (~1000, less the
# caller's stack), so they are refused up front rather than lost halfway.
MAX_NESTING = 200


class Kind(StrEnum):
    RESOLVER = "resolver"
    QUALIFICATION = "qualification"
    ACTION = "action"
    VALIDATION = "validation"


class ErrorKind(StrEnum):
    USER_CODE_EXCEPTION = "user_code_exception"
    INVALID_RETURN_TYPE = "invalid_return_type"
    TIMEOUT = "timeout"
    KILLED = "killed"
    OUT_OF_MEMORY = "out_of_memory"
    OUTPUT_LIMIT_EXCEEDED = "output_limit_exceeded"
    RESULT_TOO_LARGE = "result_too_large"
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED = "unsupported"
    IMAGE_UNAVAILABLE = "image_unavailable"
    CAPACITY = "capacity"
    INTERNAL = "internal"


class ResponseType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    BOOLEAN = "boolean"
    OBJECT = "object"
    ARRAY = "array"
    JSON = "json"


SUPPORTED_LANGUAGES = ("javascript", "typescript")


class SealedSecret(BaseModel):
    """One secret value sealed with veritech's public key (see veritech.secrets)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sealed: str = Field(min_length=1)
    key_id: str = Field(min_length=1, max_length=64)


class Request(BaseModel):
    """A function request, as sent on ``veritech.function.<kind>``.

    Unknown fields are ignored so that newer clients can talk to older servers.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    execution_id: str = Field(pattern=EXECUTION_ID_PATTERN)
    handler: str = Field(pattern=HANDLER_PATTERN)
    code: str = Field(min_length=1)
    args: Any = None
    language: str = Field(default="javascript", min_length=1, max_length=64)
    container_image: str | None = Field(default=None, min_length=1, max_length=512)
    container_tag: str | None = Field(default=None, min_length=1, max_length=128)
    timeout_ms: int | None = Field(default=None, gt=0)
    response_type: ResponseType | None = None
    secrets: dict[str, SealedSecret] | None = None

    @field_validator("response_type", mode="before")
    @classmethod
    def _response_type_from_string(cls, value: object) -> object:
        # Strict mode would refuse a plain string for an enum field; the wire
        # carries strings, so convert here and let unknown values fail.
        if isinstance(value, str):
            try:
                return ResponseType(value)
            except ValueError:
                allowed = ", ".join(t.value for t in ResponseType)
                raise ValueError(f"must be one of {allowed}") from None
        return value


def decode_json(payload: bytes) -> Any:
    """Decode a UTF-8 JSON payload; InvalidRequest for anything else."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"payload is not valid UTF-8: {exc.reason}") from exc
    try:
        return json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float
        )
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"payload is not JSON: {exc.msg}") from exc
    except RecursionError as exc:
        raise InvalidRequest("payload is nested too deeply") from exc


def _finite_float(text: str) -> float:
    # 1e999 is valid JSON, but Python reads it as infinity, which is not.
    value = float(text)
    if math.isinf(value):
        raise InvalidRequest(f"payload is not JSON: {text} is out of range")
    return value


def _refuse_constant(name: str) -> Any:
    # Python reads NaN and Infinity, which are not JSON: Deno's JSON.parse
    # would refuse the request later, inside the runner.
    raise InvalidRequest(f"payload is not JSON: {name} is not a JSON value")


def nesting_depth(value: Any, stop_at: int = MAX_NESTING + 1) -> int:
    """Levels of arrays/objects in ``value`` (iterative; stops at ``stop_at``)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest >= stop_at:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_kind(token: str) -> Kind:
    try:
        return Kind(token)
    except ValueError:
        allowed = ", ".join(k.value for k in Kind)
        raise InvalidRequest(
            f"unknown kind {token!r}: expected one of {allowed}"
        ) from None


def salvage_execution_id(document: Any) -> str:
    """The request's execution_id if it is valid, else "" (for error replies)."""
    if isinstance(document, dict):
        candidate = document.get("execution_id")
        if isinstance(candidate, str) and _EXECUTION_ID_RE.match(candidate):
            return candidate
    return ""


def json_type_name(value: Any) -> str:
    """The JSON name of a decoded value's type (null, boolean, number...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def parse_request(document: Any) -> Request:
    """Validate a decoded request object; InvalidRequest says what is wrong."""
    if not isinstance(document, dict):
        raise InvalidRequest(
            f"request must be a JSON object, not {json_type_name(document)}"
        )
    if nesting_depth(document) > MAX_NESTING:
        raise InvalidRequest(
            f"request is nested more than {MAX_NESTING} levels deep",
            salvage_execution_id(document),
        )
    try:
        return Request.model_validate(document)
    except ValidationError as exc:
        raise InvalidRequest(
            _describe_validation_error(exc), salvage_execution_id(document)
        ) from exc
    except RecursionError as exc:
        raise InvalidRequest("request is nested too deeply") from exc


def _describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"]) or "request"
        if error["type"] == "missing":
            problems.append(f"{where}: field required")
        else:
            problems.append(f"{where}: {error['msg']}")
    return "invalid request: " + "; ".join(problems)


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class MessageType(StrEnum):
    ACCEPTED = "accepted"
    OUTPUT = "output"
    HEARTBEAT = "heartbeat"
    RESULT = "result"


Stream = Literal["stdout", "stderr"]
Level = Literal["debug", "info", "warn", "error"]


def output_body(
    stream: str, level: str, message: str, timestamp: str
) -> dict[str, Any]:
    return {
        "type": MessageType.OUTPUT.value,
        "stream": stream,
        "level": level,
        "message": message,
        "timestamp": timestamp,
    }


def success_body(data: Any, unset: bool) -> dict[str, Any]:
    return {"type": "result", "status": "success", "data": data, "unset": unset}


def failure_body(
    kind: ErrorKind, message: str, name: str | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"kind": kind.value, "message": message}
    if name is not None:
        error["name"] = name
    return {"type": "result", "status": "failure", "error": error}


def is_result(body: dict[str, Any]) -> bool:
    return body.get("type") == MessageType.RESULT.value
