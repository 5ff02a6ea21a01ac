"""Resolver backends: where a resolver's value comes from.

A value can be given literally (JSON) or computed by a JavaScript function run
through veritech. Both end in ``veritech.results.outcome_body``, the one place
that checks a value against the expected type and maps null to "unset", so the
same value yields the same resolution whichever way it was produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from veritech.client._client import Client, make_request
from veritech.errors import VeritechError
from veritech.results import outcome_body
from veritech.wire import Kind, ResponseType


@dataclass(frozen=True, slots=True)
class ResolvedValue:
    value: Any
    unset: bool


class ResolverError(VeritechError):
    def __init__(self, kind: str, message: str, name: str | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.name = name


def _resolution(body: dict[str, Any]) -> ResolvedValue:
    if body.get("status") == "success":
        return ResolvedValue(body.get("data"), bool(body.get("unset")))
    error = body.get("error") or {}
    raise ResolverError(
        str(error.get("kind", "internal")),
        str(error.get("message", "")),
        error.get("name"),
    )


def _response_type(value: ResponseType | str | None) -> ResponseType | None:
    return ResponseType(value) if isinstance(value, str) else value


class LiteralBackend:
    """A value given as JSON, checked exactly like a computed one."""

    async def resolve(
        self, value: Any, response_type: ResponseType | str | None = None
    ) -> ResolvedValue:
        return _resolution(
            outcome_body(Kind.RESOLVER, value, _response_type(response_type))
        )


class JavaScriptBackend:
    """A value computed by a JavaScript (or TypeScript) function via veritech."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def resolve(
        self,
        code: str,
        *,
        handler: str = "main",
        args: Any = None,
        response_type: ResponseType | str | None = None,
        **fields: Any,
    ) -> ResolvedValue:
        # veritech is asked for any JSON value; the type check happens here, in
        # the same code the literal backend uses.
        request = make_request(code, handler=handler, args=args, **fields)
        result = await self._client.run(Kind.RESOLVER, request)
        body = {
            k: v for k, v in result.items() if k in ("status", "data", "error", "unset")
        }
        if body.get("status") != "success":
            return _resolution(body)
        if body.get("unset"):
            return ResolvedValue(None, True)
        return _resolution(
            outcome_body(Kind.RESOLVER, body.get("data"), _response_type(response_type))
        )
