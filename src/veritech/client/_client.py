"""The async client: one request out, its reply stream in.

The client never hangs: it has its own deadline (the request's timeout plus a
margin), it reports the loss of an execution once heartbeats stop for two
intervals plus a margin, and it turns NATS "no responders" into an immediate
error. It raises; it does not log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from veritech.errors import (
    ClientError,
    ClientTimeout,
    ExecutionLost,
    NoResponders,
    RequestTooLarge,
)
from veritech.wire import Kind, parse_kind

DEFAULT_TIMEOUT_MS = 30_000
DEADLINE_MARGIN_S = 5.0
HEARTBEAT_INTERVAL_S = 5.0
LOSS_MARGIN_S = 2.0


def make_request(
    code: str,
    *,
    handler: str = "main",
    args: Any = None,
    execution_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A request object; ``fields`` adds optional ones (timeout_ms, language...)."""
    request = {
        "execution_id": execution_id or uuid.uuid4().hex,
        "handler": handler,
        "code": code,
        "args": args,
    }
    request.update({k: v for k, v in fields.items() if v is not None})
    return request


class Client:
    def __init__(
        self,
        nc: NATS,
        *,
        subject_prefix: str = "",
        deadline_margin_s: float = DEADLINE_MARGIN_S,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        loss_margin_s: float = LOSS_MARGIN_S,
    ) -> None:
        self.nc = nc
        self.subject_prefix = subject_prefix
        self.deadline_margin_s = deadline_margin_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.loss_margin_s = loss_margin_s

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    def _subject(self, name: str) -> str:
        return f"{self.subject_prefix}{name}"

    async def execute(
        self, kind: Kind | str, request: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """Send ``request``; yield every reply message in order, the result last."""
        kind = parse_kind(kind) if isinstance(kind, str) else kind
        execution_id = str(request.get("execution_id", ""))

        # 1. Refuse what NATS cannot carry, before sending anything.
        payload = json.dumps(request, ensure_ascii=False).encode("utf-8")
        limit = int(self.nc.max_payload)
        if len(payload) > limit:
            raise RequestTooLarge(
                f"the request is {len(payload)} bytes, more than the NATS "
                f"max_payload of {limit} bytes",
                size=len(payload),
                limit=limit,
            )

        # 2. Listen on a private inbox, then publish with it as the reply.
        inbox = self.nc.new_inbox()
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        subscription = await self.nc.subscribe(inbox, cb=queue.put)
        try:
            await self.nc.publish(
                self._subject(f"veritech.function.{kind.value}"), payload, reply=inbox
            )
            await self.nc.flush()

            # 3. Read until the result, the deadline, or silence.
            timeout_ms = request.get("timeout_ms") or DEFAULT_TIMEOUT_MS
            deadline = time.monotonic() + timeout_ms / 1000 + self.deadline_margin_s
            silence_s = 2 * self.heartbeat_interval_s + self.loss_margin_s
            while True:
                message = await self._next(queue, deadline, silence_s, execution_id)
                yield message
                if message.get("type") == "result":
                    return
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _next(
        self,
        queue: asyncio.Queue[Msg],
        deadline: float,
        silence_s: float,
        execution_id: str,
    ) -> dict[str, Any]:
        left = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(min(left, silence_s), 0)):
                msg = await queue.get()
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise ClientTimeout(
                    f"no result for execution {execution_id} before the client's "
                    "deadline",
                    execution_id,
                ) from None
            raise ExecutionLost(
                f"execution {execution_id} was lost: no message from veritech for "
                f"{silence_s:.1f}s (heartbeats stopped)",
                execution_id,
            ) from None
        if msg.headers and msg.headers.get("Status") == "503":
            subject = msg.headers.get("Nats-Subject", "")
            raise NoResponders(
                f"no veritech is listening on {subject} (is veritech serving "
                "this NATS with the same --subject-prefix?)",
                execution_id,
            )
        try:
            document = json.loads(msg.data)
        except json.JSONDecodeError as exc:
            raise ClientError(f"veritech sent a reply that is not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise ClientError("veritech sent a reply that is not a JSON object")
        return document

    async def run(self, kind: Kind | str, request: dict[str, Any]) -> dict[str, Any]:
        """Send ``request`` and return only its result message."""
        result: dict[str, Any] = {}
        async for message in self.execute(kind, request):
            result = message
        return result

    async def kill(self, execution_id: str, timeout_s: float = 1.0) -> bool:
        """Ask the veritech running ``execution_id`` to stop it.

        True when an instance confirmed; False when none answered in time
        (nobody runs that execution).
        """
        data = json.dumps({"execution_id": execution_id}).encode()
        try:
            reply = await self.nc.request(
                self._subject("veritech.control.kill"), data, timeout=timeout_s
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return False
        return bool(json.loads(reply.data).get("killed"))

    async def status(self, window_s: float = 0.5) -> list[dict[str, Any]]:
        """Every instance's status answer gathered for ``window_s`` seconds."""
        inbox = self.nc.new_inbox()
        answers: list[dict[str, Any]] = []

        async def collect(msg: Msg) -> None:
            with contextlib.suppress(json.JSONDecodeError):
                document = json.loads(msg.data)
                if isinstance(document, dict):
                    answers.append(document)

        subscription = await self.nc.subscribe(inbox, cb=collect)
        try:
            await self.nc.publish(
                self._subject("veritech.control.status"), b"{}", reply=inbox
            )
            await self.nc.flush()
            await asyncio.sleep(window_s)
        finally:
            await subscription.unsubscribe()
        return sorted(answers, key=lambda a: str(a.get("instance", "")))


@contextlib.asynccontextmanager
async def open_client(
    nats_url: str,
    *,
    subject_prefix: str = "",
    connect_timeout_s: float = 3.0,
    **options: Any,
) -> AsyncIterator[Client]:
    """Connect to NATS and yield a client; the connection closes after.

    The first connection is given ``connect_timeout_s``; a NATS that cannot be
    reached by then is a ClientError, raised (the library does not log).
    """
    last_error: list[BaseException] = []

    async def remember(exc: Exception) -> None:
        last_error.append(exc)

    try:
        async with asyncio.timeout(connect_timeout_s):
            nc = await nats.connect(
                nats_url,
                name="veritech client",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                error_cb=remember,
            )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        reason = last_error[-1] if last_error else exc
        raise ClientError(
            f"cannot connect to NATS at {nats_url}: {reason or type(reason).__name__}"
        ) from exc
    try:
        yield Client(nc, subject_prefix=subject_prefix, **options)
    finally:
        await nc.close()
