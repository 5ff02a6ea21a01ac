"""veritech's NATS adapter: requests in, reply streams out.

Every instance subscribes to ``veritech.function.>`` in the queue group
``veritech_dispatch``, so NATS spreads requests over all of them; control
subjects (kill, status) are plain subscriptions every instance hears.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import aiohttp
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from veritech import __version__
from veritech.backends.base import Backend, Instance
from veritech.errors import (
    BackendError,
    ImageUnavailable,
    InvalidRequest,
    NatsUnavailable,
    SecretError,
)
from veritech.secrets import Redactor
from veritech.server.config import VeritechConfig
from veritech.server.pool import Pool
from veritech.server.relay import ReplyStream, result_from_frame
from veritech.wire import (
    SUPPORTED_LANGUAGES,
    ErrorKind,
    Kind,
    Request,
    decode_json,
    failure_body,
    parse_kind,
    parse_request,
    salvage_execution_id,
)

logger = logging.getLogger("veritech.server")

QUEUE_GROUP = "veritech_dispatch"
FUNCTION_SUBJECT = "veritech.function"
KILL_SUBJECT = "veritech.control.kill"
STATUS_SUBJECT = "veritech.control.status"


SHUTDOWN_REASON = "veritech shut down before the execution finished"


class State(Enum):
    NEW = "new"
    SERVING = "serving"
    STOPPING = "stopping"
    CLOSED = "closed"


# A request goes to a second instance only if the first died before it was
# handed the request; never after, so no execution runs twice.
INSTANCE_ATTEMPTS = 2


class InstanceUnusable(Exception):
    """The instance failed before it received the request."""


@dataclass(slots=True)
class Execution:
    """One execution in flight, as the kill and status paths see it."""

    request: Request
    kind: Kind
    stream: ReplyStream
    reply: str
    task: asyncio.Task[dict[str, Any]] | None = None
    instance: Instance | None = None
    killed: bool = False
    started: float | None = None
    kill_reason: str = "the execution was killed on request"
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def make_backend(config: VeritechConfig) -> Backend:
    if config.backend == "process":
        from veritech.backends.process import ProcessBackend, ProcessLimits

        limits = ProcessLimits(
            memory_mb=config.memory_mb,
            heartbeat_interval_s=config.heartbeat_interval_s,
        )
        return ProcessBackend(config.instance_id, limits, sandbox=config.sandbox)
    if config.backend == "docker":
        from veritech.backends.docker import DockerBackend

        return DockerBackend(
            config.instance_id, config.docker, config.heartbeat_interval_s
        )
    raise ValueError(f"unknown backend {config.backend!r}: expected process or docker")


def backend_image(backend: Backend, image: str) -> str:
    return backend.image_for(image, None)


class Veritech:
    def __init__(self, config: VeritechConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.id = config.instance_id
        self.backend = backend or make_backend(config)
        self.pool = Pool(
            self.backend,
            config.pool_size,
            [backend_image(self.backend, image) for image in config.images] or None,
            keep_warm_s=config.docker.keep_warm_s,
            executions_per_instance=config.executions_per_instance,
        )
        self.state = State.NEW
        self._nc: NATS | None = None
        self._subscriptions: list[Subscription] = []
        self._running: dict[str, Execution] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._housekeeping_task: asyncio.Task[None] | None = None
        self._last_nats_error: Exception | None = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        # 1. Backend first: sweep an earlier crash's leftovers before starting new.
        await self.backend.start()

        # 2. Fill the pools ahead of demand.
        await self.pool.start()

        # 3. Connect to NATS. Once connected, reconnect forever (the server may
        #    restart); but a first connection that cannot be made in time is a
        #    configuration error to report, not something to retry silently.
        try:
            async with asyncio.timeout(self.config.nats_connect_timeout_s):
                self._nc = await nats.connect(
                    self.config.nats_url,
                    name=f"veritech {self.id}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=self._on_nats_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            reason = self._last_nats_error or exc
            raise NatsUnavailable(
                self.config.nats_url,
                self.config.nats_connect_timeout_s,
                str(reason) or type(reason).__name__,
            ) from exc

        # 4. Only now take requests.
        nc = self._nc
        self._subscriptions = [
            await nc.subscribe(
                self.config.subject(f"{FUNCTION_SUBJECT}.>"),
                queue=QUEUE_GROUP,
                cb=self._on_request,
                pending_msgs_limit=1_000_000,
                pending_bytes_limit=1024 * 1024 * 1024,
            ),
            await nc.subscribe(self.config.subject(KILL_SUBJECT), cb=self._on_kill),
            await nc.subscribe(self.config.subject(STATUS_SUBJECT), cb=self._on_status),
        ]
        await nc.flush()
        self.state = State.SERVING
        self._housekeeping_task = self._spawn(self._housekeeping())
        logger.info(
            "veritech %s serving %s with the %s backend (pool size %d)",
            self.id,
            self.config.nats_url,
            self.backend.name,
            self.config.pool_size,
        )

    async def aclose(self) -> None:
        """Stop in order; idempotent."""
        if self.state in (State.STOPPING, State.CLOSED):
            return
        self.state = State.STOPPING

        # 1. Stop accepting: no new request reaches this instance.
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

        # 2. Let what runs finish, for a while; then fail it (each still gets
        #    its one result, of kind killed).
        running = [e.task for e in self._running.values() if e.task is not None]
        if running:
            _, pending = await asyncio.wait(
                running, timeout=self.config.shutdown_grace_s
            )
            for execution in list(self._running.values()):
                self._kill(execution, SHUTDOWN_REASON)
            await asyncio.gather(*pending, return_exceptions=True)
        if self._housekeeping_task is not None:
            self._housekeeping_task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

        # 3. Release every instance, then the backend's own resources.
        await self.pool.aclose()
        await self.backend.aclose()

        # 4. Close the connection last, after the final results are flushed.
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            await self._nc.close()
        self.state = State.CLOSED
        logger.info("veritech %s stopped", self.id)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(10)
            with contextlib.suppress(Exception):
                await self.pool.expire_idle()

    async def _on_nats_error(self, exc: Exception) -> None:
        self._last_nats_error = exc
        logger.warning("nats: %s", exc)

    async def _on_disconnected(self) -> None:
        if self.state is State.SERVING:
            logger.warning("nats: disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        logger.info("nats: reconnected")

    @property
    def max_payload(self) -> int:
        assert self._nc is not None
        return int(self._nc.max_payload)

    # -- control -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "instance": self.id,
            "backend": self.backend.name,
            "running": len(self._running),
            "pool": {
                image: {
                    "ready": s.ready,
                    "size": s.size,
                    "starting": s.starting,
                    "started": s.started,
                }
                for image, s in self.pool.status().items()
            },
            "version": __version__,
            "state": self.state.value,
        }

    async def _on_status(self, msg: Msg) -> None:
        if msg.reply:
            await self._publish_raw(msg.reply, self.status())

    async def _on_kill(self, msg: Msg) -> None:
        with contextlib.suppress(InvalidRequest):
            document = decode_json(msg.data)
            execution_id = salvage_execution_id(document)
            execution = self._running.get(execution_id)
            # Only the instance running the execution answers; the others stay
            # silent, so no answer means nobody runs it.
            if execution is None or not self._kill(execution):
                return
            logger.info("execution %s killed on request", execution_id)
            if msg.reply:
                await self._publish_raw(
                    msg.reply, {"execution_id": execution_id, "killed": True}
                )

    def _kill(
        self, execution: Execution, reason: str = "the execution was killed on request"
    ) -> bool:
        """Stop the execution; False when it has already ended.

        A kill that arrives before the execution's task exists (while
        ``accepted`` is being published) is remembered: the task sees the
        flag and ends at once as killed.
        """
        if execution.stream.finished or (
            execution.task is not None and execution.task.done()
        ):
            return False
        execution.killed = True
        execution.kill_reason = reason
        if execution.task is not None:
            execution.task.cancel()
        return True

    # -- one request -----------------------------------------------------------

    async def _on_request(self, msg: Msg) -> None:
        # Each request runs in its own task: the subscription callback must
        # return at once or every other request would wait behind this one.
        self._spawn(self._handle(msg, time.monotonic()))

    async def _handle(self, msg: Msg, received: float) -> None:
        # 1. No reply subject: nobody to answer; log and drop.
        if not msg.reply:
            logger.warning("request on %s without a reply subject dropped", msg.subject)
            return

        # 2. Parse; a bad request is answered with one invalid_request result.
        prefix = self.config.subject(f"{FUNCTION_SUBJECT}.")
        document: Any = None
        try:
            document = decode_json(msg.data)
            kind = parse_kind(msg.subject.removeprefix(prefix))
            request = parse_request(document)
        except InvalidRequest as exc:
            await self._reject(msg.reply, salvage_execution_id(document), exc.message)
            return
        if request.execution_id in self._running:
            await self._reject(
                msg.reply,
                request.execution_id,
                f"execution {request.execution_id} is already running here",
            )
            return

        # 3. Accept, then run it with heartbeats until its one result.
        stream = ReplyStream(
            request.execution_id,
            self.id,
            limits=self.config.output,
            max_payload=self.max_payload,
        )
        execution = Execution(request, kind, stream, msg.reply)
        self._running[request.execution_id] = execution
        try:
            await self._send(execution, stream.accepted())
            heartbeat = self._spawn(self._heartbeat(execution))
            execution.task = asyncio.create_task(self._execute(execution, received))
            try:
                result = await asyncio.shield(execution.task)
            except asyncio.CancelledError:
                # veritech itself is being cancelled: the execution still
                # ends with its one result below.
                result = await self._settle(execution)
            finally:
                heartbeat.cancel()
            await self._send(execution, result)
        except Exception:
            logger.exception(
                "execution %s failed inside veritech", request.execution_id
            )
            if not stream.finished:
                body = failure_body(ErrorKind.INTERNAL, "veritech failed internally")
                await self._send(execution, stream.result(body, 0, 0))
        finally:
            self._running.pop(request.execution_id, None)

    async def _settle(self, execution: Execution) -> dict[str, Any]:
        assert execution.task is not None
        self._kill(execution, SHUTDOWN_REASON)
        with contextlib.suppress(BaseException):
            return await execution.task
        body = failure_body(ErrorKind.INTERNAL, "veritech stopped during the execution")
        return execution.stream.result(body, 0, 0)

    async def _reject(self, reply: str, execution_id: str, message: str) -> None:
        body = failure_body(ErrorKind.INVALID_REQUEST, message)
        result = {**body, "execution_id": execution_id, "seq": 0}
        result["stats"] = {"queue_ms": 0, "run_ms": 0}
        logger.info("request rejected: %s", message)
        await self._publish_raw(reply, result)

    async def _heartbeat(self, execution: Execution) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            if execution.stream.finished:
                return
            await self._send(execution, execution.stream.heartbeat())

    async def _execute(self, execution: Execution, received: float) -> dict[str, Any]:
        """Run one execution; always returns its result message."""
        stream = execution.stream

        def finish(body: dict[str, Any]) -> dict[str, Any]:
            # queue_ms: receipt to hand-over to an instance; run_ms: from then
            # on. An execution that never reached an instance (refused, or
            # killed while it waited) spent all its time queued.
            now = time.monotonic()
            started = execution.started
            begin = started if started is not None else now
            queue_ms = round((begin - received) * 1000)
            run_ms = round((now - begin) * 1000) if started is not None else 0
            return stream.result(body, queue_ms, run_ms)

        try:
            if execution.killed:
                raise asyncio.CancelledError
            body = await self._run(execution, received)
        except asyncio.CancelledError:
            if not execution.killed:
                raise
            body = failure_body(ErrorKind.KILLED, execution.kill_reason)
        except Exception:
            logger.exception(
                "execution %s: unexpected error", execution.request.execution_id
            )
            body = failure_body(ErrorKind.INTERNAL, "veritech failed internally")
        return finish(body)

    async def _run(self, execution: Execution, received: float) -> dict[str, Any]:
        request = execution.request

        # 1. Checks that need no instance.
        if request.language not in SUPPORTED_LANGUAGES:
            supported = ", ".join(SUPPORTED_LANGUAGES)
            return failure_body(
                ErrorKind.UNSUPPORTED,
                f"language {request.language!r} is not supported; "
                f"supported: {supported}",
            )
        try:
            secret_values = self._open_secrets(request)
        except SecretError as exc:
            return failure_body(ErrorKind.INVALID_REQUEST, str(exc))
        if secret_values:
            execution.stream.redact(Redactor(secret_values.values()))

        timeout_ms = self.config.effective_timeout_ms(request.timeout_ms)
        image = self._image_of(request)
        for attempt in range(1, INSTANCE_ATTEMPTS + 1):
            # 2. Wait for a ready instance, within the execution's timeout.
            remaining = timeout_ms / 1000 - (time.monotonic() - received)
            try:
                async with asyncio.timeout(max(remaining, 0.001)):
                    instance = await self.pool.acquire(image)
            except TimeoutError:
                return failure_body(
                    ErrorKind.CAPACITY,
                    f"no instance became free within the timeout of {timeout_ms} "
                    f"ms (pool size {self.config.pool_size})",
                )
            except ImageUnavailable as exc:
                return failure_body(ErrorKind.IMAGE_UNAVAILABLE, str(exc))
            except BackendError as exc:
                return failure_body(ErrorKind.INTERNAL, f"no instance: {exc}")
            execution.started = time.monotonic()
            execution.instance = instance

            # 3. Run it, then give the instance back: single use discards it,
            #    reuse keeps it if the execution ended cleanly. An instance
            #    that died between ready and use never saw the request, so
            #    the request may safely go to another one.
            reusable = False
            try:
                body = await self._run_on(
                    instance, execution, timeout_ms, secret_values
                )
                reusable = not execution.killed and _leaves_instance_clean(body)
            except InstanceUnusable as exc:
                if attempt == INSTANCE_ATTEMPTS:
                    return await self._lost(instance, str(exc))
                logger.warning(
                    "execution %s: instance %s unusable (%s); taking another",
                    request.execution_id,
                    instance.id,
                    exc,
                )
                continue
            finally:
                self._spawn(self.pool.release(instance, reusable))
            return body
        raise AssertionError("unreachable: the last attempt returns")

    def _image_of(self, request: Request) -> str:
        if request.container_image is None and self.config.images:
            return self.backend.image_for(self.config.images[0], None)
        return self.backend.image_for(request.container_image, request.container_tag)

    def _open_secrets(self, request: Request) -> dict[str, str]:
        if not request.secrets:
            return {}
        if self.config.keyring is None:
            raise SecretError("this veritech has no key configured to open secrets")
        return self.config.keyring.open_all(request.secrets)

    async def _run_on(
        self,
        instance: Instance,
        execution: Execution,
        timeout_ms: int,
        secret_values: dict[str, str],
    ) -> dict[str, Any]:
        backstop_s = timeout_ms / 1000 + self.config.timeout_grace_s
        try:
            async with asyncio.timeout(backstop_s):
                return await self._session(
                    instance, execution, timeout_ms, secret_values
                )
        except TimeoutError:
            await instance.kill()
            return failure_body(
                ErrorKind.TIMEOUT,
                f"the function did not finish within its timeout of {timeout_ms} ms",
            )
        except (aiohttp.ClientError, OSError) as exc:
            return await self._lost(
                instance, f"the instance could not be reached: {exc}"
            )

    async def _session(
        self,
        instance: Instance,
        execution: Execution,
        timeout_ms: int,
        secret_values: dict[str, str],
    ) -> dict[str, Any]:
        stream = execution.stream
        try:
            ws = await instance.connection.open_execution(execution.kind.value)
        except (aiohttp.ClientError, OSError) as exc:
            raise InstanceUnusable(f"the instance could not be reached: {exc}") from exc
        async with ws:
            # 1. cyclone greets with start; then it gets the request.
            first = await ws.receive()
            if (
                first.type != aiohttp.WSMsgType.TEXT
                or _frame_type(first.data) != "start"
            ):
                raise InstanceUnusable("the instance did not start the session")
            payload = execution.request.model_dump(mode="json", exclude={"secrets"})
            payload.update(
                kind=execution.kind.value,
                timeout_ms=timeout_ms,
                secret_values=secret_values,
            )
            await ws.send_str(json.dumps(payload, ensure_ascii=False))

            # 2. Relay frames until the result.
            async for message in ws:
                # The protocol has JSON text frames only: a binary frame, or
                # one aiohttp rejects (bad UTF-8, reserved opcode: ERROR), is
                # the instance's fault, not a session that merely ended.
                if message.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.ERROR):
                    return failure_body(
                        ErrorKind.INTERNAL, "the instance sent a malformed frame"
                    )
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                frame = _decode_frame(message.data)
                if frame is None:
                    return failure_body(
                        ErrorKind.INTERNAL, "the instance sent a malformed frame"
                    )
                kind = frame.get("type")
                if kind == "output":
                    for out in stream.output(frame):
                        await self._send(execution, out)
                    if stream.limit_exceeded is not None:
                        await instance.kill()
                        return stream.limit_result()
                elif kind == "result":
                    return await self._explain(instance, result_from_frame(frame))
                elif kind == "fail":
                    return failure_body(
                        ErrorKind.INTERNAL,
                        f"the instance failed: {str(frame.get('message', ''))[:500]}",
                    )
                elif kind != "heartbeat":
                    logger.warning(
                        "execution %s: unknown frame type %r from the instance ignored",
                        execution.request.execution_id,
                        kind,
                    )
        # 3. The session ended before a result: ask the backend what happened.
        return await self._lost(
            instance, "the instance ended the session before a result"
        )

    async def _explain(
        self, instance: Instance, body: dict[str, Any]
    ) -> dict[str, Any]:
        """An internal failure cyclone reports may have a cause only the backend
        sees: a container's memory limit kills the runner (the largest process)
        while cyclone survives to report a lost runner."""
        error = body.get("error")
        if not isinstance(error, dict) or error.get("kind") != ErrorKind.INTERNAL:
            return body
        explained = await self._lost(instance, str(error.get("message", "")))
        return body if explained["error"]["kind"] == ErrorKind.INTERNAL else explained

    async def _lost(self, instance: Instance, fallback: str) -> dict[str, Any]:
        reason = None
        with contextlib.suppress(Exception):
            # A container's exit status may lag the broken socket a little.
            for _ in range(20):
                reason = await instance.exit_reason()
                if reason is not None and reason[0] is not ErrorKind.INTERNAL:
                    break
                await asyncio.sleep(0.05)
        if reason is not None:
            return failure_body(reason[0], f"{fallback}: {reason[1]}")
        return failure_body(ErrorKind.INTERNAL, fallback)

    # -- publishing --------------------------------------------------------------

    async def _send(self, execution: Execution, message: dict[str, Any]) -> None:
        # One lock per execution keeps messages on the wire in seq order even
        # though the heartbeat and the relay publish from different tasks.
        async with execution.lock:
            await self._publish_raw(execution.reply, message)

    async def _publish_raw(self, subject: str, message: dict[str, Any]) -> None:
        assert self._nc is not None
        data = json.dumps(message, ensure_ascii=False).encode("utf-8")
        try:
            await self._nc.publish(subject, data)
        except Exception as exc:
            logger.error(
                "publish to %s failed (%s): %d bytes lost", subject, exc, len(data)
            )


def _leaves_instance_clean(body: dict[str, Any]) -> bool:
    """Whether an instance may serve again after an execution with this result.

    Only outcomes that cyclone itself reported after a normal session qualify;
    anything that hints at a damaged instance discards it.
    """
    if body.get("status") == "success":
        return True
    kind = (body.get("error") or {}).get("kind")
    return kind in (
        ErrorKind.USER_CODE_EXCEPTION.value,
        ErrorKind.INVALID_RETURN_TYPE.value,
        ErrorKind.TIMEOUT.value,
    )


def _frame_type(data: str) -> Any:
    frame = _decode_frame(data)
    return None if frame is None else frame.get("type")


def _decode_frame(data: str) -> dict[str, Any] | None:
    try:
        frame = json.loads(data)
    except (json.JSONDecodeError, RecursionError):
        return None
    return frame if isinstance(frame, dict) else None


@contextlib.asynccontextmanager
async def open_veritech(config: VeritechConfig) -> AsyncIterator[Veritech]:
    """Start a veritech and stop it (in order) when the block ends."""
    server = Veritech(config)
    try:
        await server.start()
        yield server
    finally:
        await server.aclose()


async def serve_veritech(config: VeritechConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    async with open_veritech(config):
        await stop.wait()
