"""Faults injected into a real stack: each execution still ends with exactly
one result (or, where veritech itself is gone, a clear client-side error well
before the deadline), the next request is served normally, and no process,
socket or instance directory is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from conftest import StartVeritech, wait_until
from veritech.backends.base import Backend, Instance
from veritech.backends.process import ProcessInstance, default_runtime_root
from veritech.client import Client, make_request
from veritech.errors import ExecutionLost
from veritech.natsd import open_nats_server
from veritech.server.config import VeritechConfig
from veritech.server.server import Veritech
from veritech.wire import ErrorKind

VERITECH = str(Path(sys.executable).parent / "veritech")
PAUSED = (
    "function main() { console.log('started');"
    " return new Promise((resolve) => setTimeout(() => resolve(1), 60000)) }"
)


# -- processes, from /proc ----------------------------------------------------


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name may hold spaces; the fields after it do not.
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie has exited and only awaits its reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def instance_dirs(owner_id: str) -> list[Path]:
    return sorted(default_runtime_root().glob(f"{owner_id}-*"))


def instance_processes(owner_id: str) -> set[int]:
    """bwrap and cyclone processes of ``owner_id``'s instances, and below."""
    marker = f"{default_runtime_root()}/{owner_id}-"
    roots = {pid for pid in _parents() if marker in cmdline(pid) and pid != os.getpid()}
    found = set(roots)
    for pid in roots:
        found |= descendants(pid)
    return {pid for pid in found if alive(pid)}


def runner_of(instance: ProcessInstance) -> int:
    (pid,) = [p for p in descendants(instance.pid) if "lang_js.ts" in cmdline(p)]
    return pid


def cyclone_of(instance: ProcessInstance) -> int:
    (pid,) = [
        p
        for p in descendants(instance.pid)
        if "veritech.cyclone" in cmdline(p) and "bwrap" not in cmdline(p)
    ]
    return pid


async def assert_nothing_left(server: Veritech) -> None:
    """Close ``server``; then no instance process or directory may remain."""
    tracked = instance_processes(server.id)
    assert tracked, "the pool should have had instance processes"
    await server.aclose()
    await wait_until(
        lambda: (
            not any(alive(p) for p in tracked)
            and not instance_processes(server.id)
            and not instance_dirs(server.id)
        ),
        30,
        f"the processes and directories of {server.id} to be gone",
    )


# -- helpers -----------------------------------------------------------------


def assert_one_result_last(messages: list[dict[str, Any]]) -> dict[str, Any]:
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert [m["type"] for m in messages].count("result") == 1
    assert messages[0]["type"] == "accepted"
    assert messages[-1]["type"] == "result"
    return messages[-1]


async def assert_serves_next(client: Client) -> None:
    request = make_request("function main(a) { return a + 1 }", args=41)
    result = await client.run("resolver", request)
    assert (result["status"], result["data"]) == ("success", 42)


async def collect(
    client: Client, request: dict[str, Any], into: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    async for message in client.execute("resolver", request):
        into.append(message)
    return into


# -- the function misbehaves ---------------------------------------------------

FUNCTION_FAULTS = [
    pytest.param(
        "function main() { Deno.exit(3) }",
        None,
        {
            "status": "failure",
            "error": {
                "kind": "user_code_exception",
                "message": "the runner exited with code 3 before returning a "
                "result (the function may have called Deno.exit)",
            },
        },
        id="deno-exit",
    ),
    pytest.param(
        "function main() { setTimeout(() => { throw new Error('late') }, 0);"
        " return 1 }",
        None,
        {"status": "success", "data": 1, "unset": False},
        id="throw-after-returning",
    ),
    pytest.param(
        "function main() { setTimeout(() => { throw new RangeError('early') }, 0);"
        " return new Promise((resolve) => setTimeout(() => resolve(1), 200)) }",
        None,
        {
            "status": "failure",
            "error": {
                "kind": "user_code_exception",
                "name": "RangeError",
                "message": "early",
            },
        },
        id="throw-asynchronously-while-pending",
    ),
    pytest.param(
        "function main() { setInterval(() => console.log('tick'), 1); return 2 }",
        None,
        {"status": "success", "data": 2, "unset": False},
        id="timers-left-running",
    ),
    pytest.param(
        "function main() { return new Promise(() => {}) }",
        None,
        {
            "status": "failure",
            "error": {
                "kind": "user_code_exception",
                "name": "UnsettledPromise",
                "message": "the handler's promise never settled and nothing is "
                "left to wait for",
            },
        },
        id="never-resolves",
    ),
    pytest.param(
        "function main() { setTimeout(() => {}, 1e9); return new Promise(() => {}) }",
        1500,
        {
            "status": "failure",
            "error": {
                "kind": "timeout",
                "message": "the function did not finish within its timeout of 1500 ms",
            },
        },
        id="never-resolves-with-a-far-timer",
    ),
]


@pytest.mark.parametrize(("code", "timeout_ms", "expected"), FUNCTION_FAULTS)
async def test_misbehaving_function_gets_exactly_one_result(
    start_veritech: StartVeritech,
    client: Client,
    code: str,
    timeout_ms: int | None,
    expected: dict[str, Any],
) -> None:
    veritech = await start_veritech()
    request = make_request(code, timeout_ms=timeout_ms)

    messages = await collect(client, request, [])

    result = assert_one_result_last(messages)
    assert {k: result[k] for k in expected} == expected
    await assert_serves_next(client)
    await assert_nothing_left(veritech)


# -- a process dies mid-execution ---------------------------------------------


@pytest.mark.parametrize(
    ("victim", "expected_message"),
    [
        ("runner", "the runner process was killed"),
        ("cyclone", "the instance ended the session before a result"),
        ("instance", "the instance ended the session before a result"),
    ],
)
async def test_process_killed_mid_execution_gives_one_internal_result(
    start_veritech: StartVeritech,
    client: Client,
    victim: str,
    expected_message: str,
) -> None:
    # 1. Start an execution that waits; find its processes once it printed.
    veritech = await start_veritech()
    request = make_request(PAUSED, timeout_ms=60_000)
    messages: list[dict[str, Any]] = []
    task = asyncio.create_task(collect(client, request, messages))
    await wait_until(
        lambda: any(m["type"] == "output" for m in messages) or task.done(),
        what="the execution to print",
    )
    instance = veritech._running[request["execution_id"]].instance
    assert isinstance(instance, ProcessInstance)
    victims = {
        "runner": runner_of,
        "cyclone": cyclone_of,
        "instance": lambda i: i.pid,
    }
    pid = victims[victim](instance)

    # 2. Kill it by PID; the execution still ends with one result, at once.
    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(20):
        await task

    result = assert_one_result_last(messages)
    assert result["status"] == "failure"
    assert result["error"]["kind"] == ErrorKind.INTERNAL.value
    assert result["error"]["message"].startswith(expected_message)
    await assert_serves_next(client)
    await assert_nothing_left(veritech)


@contextlib.asynccontextmanager
async def open_veritech_process(
    nats_url: str, prefix: str, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`veritech serve` as a child process; killed and reaped at the end."""
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            VERITECH,
            "serve",
            "--nats-url",
            nats_url,
            "--subject-prefix",
            prefix,
            "--heartbeat-interval",
            "0.5",
            "--pool-size",
            "1",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_veritech_killed_mid_execution_client_reports_loss_and_nothing_survives(
    start_veritech: StartVeritech,
    nc: NATS,
    nats_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    client = Client(nc, subject_prefix=prefix, heartbeat_interval_s=0.5)
    async with open_veritech_process(nats_url, prefix, tmp_path / "log") as process:
        # 1. Wait until the veritech process answers; start a long execution.
        async def answers() -> bool:
            return bool(await client.status(window_s=0.2))

        async with asyncio.timeout(60):
            while not await answers():
                assert process.returncode is None, (tmp_path / "log").read_text()
        request = make_request(PAUSED, timeout_ms=120_000)
        messages: list[dict[str, Any]] = []
        task = asyncio.create_task(collect(client, request, messages))
        await wait_until(
            lambda: any(m["type"] == "output" for m in messages) or task.done(),
            what="the execution to print",
        )
        owner_id = messages[0]["instance"]
        orphans = descendants(process.pid)
        dirs = instance_dirs(owner_id)
        assert any("lang_js.ts" in cmdline(p) for p in orphans)
        assert dirs

        # 2. Kill veritech: the client sees the heartbeats stop and reports the
        #    loss after two intervals plus its margin (3 s), far before the
        #    120 s deadline. The bound is generous for a loaded machine.
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        process.kill()
        with pytest.raises(ExecutionLost) as lost:
            async with asyncio.timeout(30):
                await task
        waited = loop.time() - killed_at

    assert str(lost.value) == (
        f"execution {request['execution_id']} was lost: no message from "
        "veritech for 3.0s (heartbeats stopped)"
    )
    assert lost.value.execution_id == request["execution_id"]
    assert 2.5 < waited < 20

    # 3. The orphaned instances die by themselves (bubblewrap dies with its
    #    parent; cyclone's watch timeout backs that up) ...
    await wait_until(
        lambda: not any(alive(p) for p in orphans),
        30,
        "the orphaned instance processes to exit",
    )

    # 4. ... and the next veritech to start sweeps their directories.
    await start_veritech()
    assert instance_dirs(owner_id) == []


# -- NATS restarts -------------------------------------------------------------


class RestartableNats:
    """A bundled nats-server that can be stopped and started at one address."""

    def __init__(self) -> None:
        self.url = ""
        self._port: int | None = None
        self._server: contextlib.AbstractAsyncContextManager[str] | None = None

    async def start(self) -> None:
        self._server = open_nats_server(port=self._port)
        self.url = await self._server.__aenter__()
        self._port = int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def open_restartable_nats() -> AsyncIterator[RestartableNats]:
    natsd = RestartableNats()
    await natsd.start()
    try:
        yield natsd
    finally:
        await natsd.stop()


@contextlib.asynccontextmanager
async def open_reconnecting_client(
    url: str, prefix: str
) -> AsyncIterator[tuple[NATS, Client]]:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield nc, Client(nc, subject_prefix=prefix, heartbeat_interval_s=0.5)
    finally:
        await nc.close()


async def wait_for_answer(client: Client) -> None:
    async with asyncio.timeout(30):
        while not await client.status(window_s=0.2):
            pass


async def restart(natsd: RestartableNats, nc: NATS, client: Client) -> None:
    """Stop the server, start it again at the same address; return once
    veritech answers again (it has reconnected and subscribed again)."""
    await natsd.stop()
    await wait_until(lambda: not nc.is_connected, 10, "the client to notice")
    await natsd.start()
    await wait_for_answer(client)


async def test_nats_restart_while_idle_veritech_reconnects_and_serves(
    start_veritech: StartVeritech, prefix: str
) -> None:
    async with open_restartable_nats() as natsd:
        veritech = await start_veritech(nats_url=natsd.url, heartbeat_interval_s=0.5)
        async with open_reconnecting_client(natsd.url, prefix) as (nc, client):
            await assert_serves_next(client)

            await restart(natsd, nc, client)

            await assert_serves_next(client)
            assert veritech.status()["state"] == "serving"
        await assert_nothing_left(veritech)


async def test_nats_restart_during_an_execution_its_result_still_arrives(
    start_veritech: StartVeritech, prefix: str
) -> None:
    # What docs/limitations.md ("NATS restarts") promises: an execution that
    # outlives a short outage still delivers its result, because veritech and
    # the client both reconnect and the client's inbox subscription is made
    # again; messages published while the server was down may be lost, which
    # the seq numbers show as a gap.
    async with open_restartable_nats() as natsd:
        veritech = await start_veritech(nats_url=natsd.url, heartbeat_interval_s=0.5)
        async with open_reconnecting_client(natsd.url, prefix) as (nc, client):
            code = (
                "async function main() { console.log('before');"
                " await new Promise((resolve) => setTimeout(resolve, 2500));"
                " console.log('after'); return 42 }"
            )
            request = make_request(code, timeout_ms=60_000)
            messages: list[dict[str, Any]] = []
            task = asyncio.create_task(collect(client, request, messages))
            await wait_until(
                lambda: any(m["type"] == "output" for m in messages) or task.done(),
                what="the execution to print",
            )

            await restart(natsd, nc, client)
            async with asyncio.timeout(30):
                await task

            result = messages[-1]
            assert [m["type"] for m in messages].count("result") == 1
            assert (result["type"], result["status"], result["data"]) == (
                "result",
                "success",
                42,
            )
            seqs = [m["seq"] for m in messages]
            assert seqs == sorted(set(seqs))
            assert [m.get("message") for m in messages if m["type"] == "output"][
                -1
            ] == "after"
            await assert_serves_next(client)
        await assert_nothing_left(veritech)


# -- a hostile cyclone ---------------------------------------------------------


def raw_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked server-to-client WebSocket frame, FIN set (payload < 126)."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


class HostileCyclone:
    """A real HTTP/WebSocket server on a Unix socket that speaks cyclone's
    paths but answers each execution as its request's ``args.mode`` says."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.sessions: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/readiness", self._readiness)
        app.router.add_get("/liveness", self._readiness)
        app.router.add_get("/watch", self._watch)
        app.router.add_get("/execute/{kind}", self._execute)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _readiness(self, _: web.Request) -> web.Response:
        return web.Response(text="ready")

    async def _watch(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sessions.add(ws)
        try:
            async for _ in ws:
                pass
        finally:
            self.sessions.discard(ws)
        return ws

    async def _execute(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sessions.add(ws)
        try:
            await ws.send_json({"type": "start"})
            document = json.loads((await ws.receive()).data)
            await self._misbehave(ws, request, document)
            # Keep the session open: veritech must end it, not wait on it.
            async for _ in ws:
                pass
        finally:
            self.sessions.discard(ws)
        return ws

    async def _misbehave(
        self, ws: web.WebSocketResponse, request: web.Request, document: Any
    ) -> None:
        execution_id = document["execution_id"]
        mode = document["args"]["mode"]

        def result(data: Any) -> dict[str, Any]:
            return {
                "type": "result",
                "status": "success",
                "data": data,
                "unset": False,
                "execution_id": execution_id,
            }

        transport = request.transport
        assert transport is not None
        if mode == "honest":
            await ws.send_json(result("fine"))
            await ws.send_json({"type": "finish"})
        elif mode == "not-json":
            await ws.send_str("this is not JSON {")
        elif mode == "not-an-object":
            await ws.send_str("[1, 2, 3]")
        elif mode == "binary":
            await ws.send_bytes(b"\x00\x01binary")
        elif mode == "invalid-utf8":
            transport.write(raw_frame(0x1, b'{"type": "\xff\xfe"}'))
        elif mode == "reserved-opcode":
            transport.write(raw_frame(0x3, b"??"))
        elif mode == "unknown-type":
            await ws.send_json({"type": "surprise", "execution_id": execution_id})
            await ws.send_json(result("after the surprise"))
            await ws.send_json({"type": "finish"})
        elif mode == "malformed-result":
            await ws.send_json({"type": "result", "status": "perhaps"})
        elif mode == "closes-without-result":
            await ws.send_json({"type": "output", "message": "bye", "stream": "stdout"})
            await ws.close()


class HostileInstance(Instance):
    def __init__(self, instance_id: str, socket_path: Path) -> None:
        super().__init__(instance_id, "local", socket_path)
        self.closed = False

    @property
    def alive(self) -> bool:
        return not self.closed

    async def kill(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True
        await self.connection.aclose()


class HostileBackend(Backend):
    name = "hostile"

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.instances: list[HostileInstance] = []

    async def start(self) -> None:
        return None

    async def start_instance(self, image: str) -> Instance:
        instance = HostileInstance(f"hostile-{len(self.instances)}", self.socket_path)
        self.instances.append(instance)
        await instance.wait_ready()
        return instance

    async def aclose(self) -> None:
        await asyncio.gather(*(i.aclose() for i in self.instances))


MALFORMED = "the instance sent a malformed frame"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("not-json", {"status": "failure", "kind": "internal", "message": MALFORMED}),
        (
            "not-an-object",
            {"status": "failure", "kind": "internal", "message": MALFORMED},
        ),
        ("binary", {"status": "failure", "kind": "internal", "message": MALFORMED}),
        (
            "invalid-utf8",
            {"status": "failure", "kind": "internal", "message": MALFORMED},
        ),
        (
            "reserved-opcode",
            {"status": "failure", "kind": "internal", "message": MALFORMED},
        ),
        (
            "malformed-result",
            {
                "status": "failure",
                "kind": "internal",
                "message": "cyclone sent a malformed result frame",
            },
        ),
        (
            "closes-without-result",
            {
                "status": "failure",
                "kind": "internal",
                "message": "the instance ended the session before a result",
            },
        ),
        ("unknown-type", {"status": "success", "data": "after the surprise"}),
    ],
)
async def test_hostile_cyclone_frames_end_in_exactly_one_result(
    nats_url: str,
    prefix: str,
    client: Client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    expected: dict[str, Any],
) -> None:
    hostile = HostileCyclone(tmp_path / "cyclone.sock")
    await hostile.start()
    config = VeritechConfig(
        nats_url=nats_url, subject_prefix=prefix, pool_size=1, shutdown_grace_s=1
    )
    veritech = Veritech(config, backend=HostileBackend(hostile.socket_path))
    try:
        await veritech.start()
        # A publish from a connection made before veritech subscribed can
        # still meet "no responders" for a moment (seen with nats-server
        # 2.15); wait until veritech answers on this connection.
        await wait_for_answer(client)
        caplog.set_level(logging.WARNING, logger="veritech.server")
        request = make_request("unused", args={"mode": mode}, timeout_ms=10_000)

        async with asyncio.timeout(20):
            messages = await collect(client, request, [])

        result = assert_one_result_last(messages)
        got = {"status": result["status"]}
        if result["status"] == "success":
            got["data"] = result["data"]
        else:
            got.update(kind=result["error"]["kind"], message=result["error"]["message"])
        assert got == expected
        warnings = [
            r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
        ]
        if mode == "unknown-type":
            assert warnings == [
                f"execution {request['execution_id']}: unknown frame type "
                "'surprise' from the instance ignored"
            ]
        else:
            assert not any("surprise" in w for w in warnings)

        # The next request is served normally, by a fresh instance.
        honest = make_request("unused", args={"mode": "honest"})
        assert (await client.run("resolver", honest))["data"] == "fine"
    finally:
        await veritech.aclose()
        await hostile.aclose()
    # Every session veritech opened (executions, watches) is closed.
    assert hostile.sessions == set()
