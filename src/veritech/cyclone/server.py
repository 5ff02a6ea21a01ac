"""cyclone's HTTP/WebSocket server (docs/protocol.md, section 2).

One cyclone serves executions one at a time. It keeps a runner started ahead of
demand, so /readiness is 200 only while a loaded runner is waiting. With
``oneshot`` it serves a single execution and exits; with a watch timeout it
exits once no /watch session has been open for that long, so an instance whose
veritech died does not outlive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from veritech.cyclone.protocol import Output, Returned, Threw
from veritech.cyclone.runner import (
    Crashed,
    Ending,
    Runner,
    RunnerConfig,
    RunnerStartError,
)
from veritech.errors import InvalidRequest
from veritech.results import Thrown, outcome_body
from veritech.wire import (
    SUPPORTED_LANGUAGES,
    ErrorKind,
    Kind,
    Request,
    failure_body,
    output_body,
    parse_kind,
    parse_request,
    salvage_execution_id,
)

logger = logging.getLogger("cyclone.server")

REQUEST_WAIT_S = 30.0
MAX_REQUEST_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class CycloneConfig:
    runner: RunnerConfig
    bind_uds: Path | None = None
    bind_host: str = "127.0.0.1"
    bind_port: int = 0
    oneshot: bool = False
    watch_timeout_s: float | None = None
    heartbeat_interval_s: float = 5.0
    default_timeout_ms: int = 30_000
    socket_mode: int = 0o600


class Cyclone:
    def __init__(self, config: CycloneConfig) -> None:
        self._config = config
        self._runner: Runner | None = None
        self._runner_task: asyncio.Task[Runner] | None = None
        self._busy = False
        self._served = 0
        self._stop = asyncio.Event()
        self._watchers = 0
        self._last_watched = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------

    async def serve(self) -> None:
        """Serve until SIGTERM/SIGINT, the oneshot execution, or watch expiry."""
        # 1. Start the runner first: readiness means a runner is waiting.
        self._start_runner()

        # 2. Bind. A stale socket from a crashed predecessor is unlinked first.
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_get("/liveness", self._liveness)
        app.router.add_get("/readiness", self._readiness)
        app.router.add_get("/execute/{kind}", self._execute)
        app.router.add_get("/watch", self._watch)
        app_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await app_runner.setup()
        site = await self._bind(app_runner)
        logger.info("cyclone listening on %s", site.name)

        # 3. Stop on a signal, on watch expiry, or after the oneshot execution.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        if self._config.watch_timeout_s:
            self._spawn(self._watchdog(self._config.watch_timeout_s))
        try:
            await self._stop.wait()
        finally:
            # 4. Shut down: kill the runner, close the site, remove the socket.
            logger.info("cyclone stopping")
            await self._close_runner()
            for task in list(self._tasks):
                task.cancel()
            await app_runner.cleanup()
            if self._config.bind_uds is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._config.bind_uds.unlink()

    async def _bind(self, app_runner: web.AppRunner) -> web.BaseSite:
        site: web.BaseSite
        if self._config.bind_uds is not None:
            path = self._config.bind_uds
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            site = web.UnixSite(app_runner, str(path))
            await site.start()
            os.chmod(path, self._config.socket_mode)
            return site
        site = web.TCPSite(app_runner, self._config.bind_host, self._config.bind_port)
        await site.start()
        return site

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_runner(self) -> None:
        self._runner = None
        self._runner_task = asyncio.create_task(Runner.start(self._config.runner))

    async def _take_runner(self) -> Runner:
        assert self._runner_task is not None
        runner = await self._runner_task
        self._runner_task = None
        return runner

    async def _close_runner(self) -> None:
        task = self._runner_task
        if task is None:
            return
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            runner = await task
            await runner.kill()

    async def _watchdog(self, timeout_s: float) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(min(0.5, timeout_s / 4))
            if self._watchers == 0 and not self._busy:
                idle = time.monotonic() - self._last_watched
                if idle > timeout_s:
                    logger.warning("no watch session for %.1fs: exiting", idle)
                    self._stop.set()

    # -- HTTP --------------------------------------------------------------

    async def _liveness(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readiness(self, _: web.Request) -> web.Response:
        task = self._runner_task
        ready = (
            not self._busy
            and task is not None
            and task.done()
            and not task.cancelled()
            and task.exception() is None
            and task.result().alive
        )
        if ready:
            return web.Response(text="ready")
        return web.Response(status=503, text="not ready")

    async def _watch(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        self._watchers += 1
        try:
            async for _ in ws:
                pass
        finally:
            self._watchers -= 1
            self._last_watched = time.monotonic()
        return ws

    async def _execute(self, request: web.Request) -> web.StreamResponse:
        try:
            kind = parse_kind(request.match_info["kind"])
        except InvalidRequest as exc:
            return web.Response(status=404, text=exc.message)
        if self._busy or (self._config.oneshot and self._served > 0):
            return web.Response(status=409, text="an execution is already running")
        self._busy = True
        self._served += 1
        try:
            ws = web.WebSocketResponse(max_msg_size=MAX_REQUEST_BYTES, heartbeat=None)
            await ws.prepare(request)
            await self._session(ws, kind)
            await ws.close()
            return ws
        finally:
            self._busy = False
            if self._config.oneshot:
                self._stop.set()
            elif not self._stop.is_set():
                self._start_runner()

    # -- one execution -------------------------------------------------------

    async def _session(self, ws: web.WebSocketResponse, kind: Kind) -> None:
        await ws.send_json({"type": "start"})

        # 1. Read and check the request.
        document = await self._receive_request(ws)
        if document is None:
            return
        execution_id = salvage_execution_id(document)
        try:
            parsed = parse_request(document)
        except InvalidRequest as exc:
            await self._send_result(
                ws, execution_id, failure_body(ErrorKind.INVALID_REQUEST, exc.message)
            )
            return
        if parsed.language not in SUPPORTED_LANGUAGES:
            body = failure_body(
                ErrorKind.UNSUPPORTED,
                f"language {parsed.language!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_LANGUAGES)}",
            )
            await self._send_result(ws, execution_id, body)
            return

        # 2. Run it on the waiting runner, relaying output and heartbeats. If
        #    veritech closes the session first (a kill, or veritech died), the
        #    run is cancelled, which kills the runner: nobody would read a result.
        started = time.monotonic()
        heartbeat = self._spawn(self._heartbeat(ws, execution_id))
        run = asyncio.create_task(self._run(parsed, kind, document, ws))
        closed = asyncio.create_task(_until_closed(ws))
        try:
            await asyncio.wait({run, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            heartbeat.cancel()
            closed.cancel()
            if not run.done():
                run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        if run.cancelled():
            logger.info("session closed by peer; execution %s stopped", execution_id)
            return
        run_ms = round((time.monotonic() - started) * 1000)

        # 3. Report exactly one result, then finish.
        body = _result_body(kind, parsed, run.result())
        await self._send_result(ws, execution_id, body, run_ms)
        await ws.send_json({"type": "finish"})

    async def _receive_request(self, ws: web.WebSocketResponse) -> Any:
        try:
            async with asyncio.timeout(REQUEST_WAIT_S):
                message = await ws.receive()
        except TimeoutError:
            await ws.send_json({"type": "fail", "message": "no request received"})
            return None
        if message.type is not WSMsgType.TEXT:
            await ws.send_json(
                {"type": "fail", "message": "expected the request as a text frame"}
            )
            return None
        try:
            document = json.loads(message.data)
        except (json.JSONDecodeError, RecursionError):
            await self._send_result(
                ws, "", failure_body(ErrorKind.INVALID_REQUEST, "request is not JSON")
            )
            return None
        return document

    async def _run(
        self,
        parsed: Request,
        kind: Kind,
        document: dict[str, Any],
        ws: web.WebSocketResponse,
    ) -> Ending:
        try:
            runner = await self._take_runner()
            if not runner.alive:
                # The waiting runner died while idle (killed from outside): a
                # fresh one costs a runner start, not the execution.
                logger.warning("the waiting runner had died; starting another")
                await runner.kill()
                runner = await Runner.start(self._config.runner)
        except (RunnerStartError, OSError) as exc:
            logger.error("runner unavailable: %s", exc)
            return Crashed(ErrorKind.INTERNAL, f"the runner could not start: {exc}")

        async def emit(event: Output) -> None:
            if not ws.closed:
                await ws.send_json(
                    {
                        **output_body(
                            event.stream, event.level, event.message, event.timestamp
                        ),
                        "execution_id": parsed.execution_id,
                    }
                )

        secret_values = document.get("secret_values")
        payload = {
            "kind": kind.value,
            "handler": parsed.handler,
            "code": parsed.code,
            "language": parsed.language,
            "args": parsed.args,
            "secrets": secret_values if isinstance(secret_values, dict) else {},
        }
        timeout_ms = parsed.timeout_ms or self._config.default_timeout_ms
        return await runner.execute(payload, timeout_ms / 1000, emit)

    async def _heartbeat(self, ws: web.WebSocketResponse, execution_id: str) -> None:
        while not ws.closed:
            await asyncio.sleep(self._config.heartbeat_interval_s)
            with contextlib.suppress(ConnectionError):
                await ws.send_json({"type": "heartbeat", "execution_id": execution_id})

    async def _send_result(
        self,
        ws: web.WebSocketResponse,
        execution_id: str,
        body: dict[str, Any],
        run_ms: int = 0,
    ) -> None:
        if ws.closed:
            return
        await ws.send_json(
            {**body, "execution_id": execution_id, "stats": {"run_ms": run_ms}}
        )


async def _until_closed(ws: web.WebSocketResponse) -> None:
    async for _ in ws:
        pass


def _result_body(kind: Kind, parsed: Request, ending: Ending) -> dict[str, Any]:
    if isinstance(ending, Returned):
        return outcome_body(kind, ending.value, parsed.response_type)
    if isinstance(ending, Threw):
        if ending.name == "UnserializableReturn":
            return failure_body(ErrorKind.INVALID_RETURN_TYPE, ending.message)
        return outcome_body(
            kind, None, parsed.response_type, thrown=Thrown(ending.name, ending.message)
        )
    return failure_body(ending.kind, ending.message)


async def serve_cyclone(config: CycloneConfig) -> None:
    await Cyclone(config).serve()
