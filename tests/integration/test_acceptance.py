"""Acceptance checks of the main job, each against real parts.

The first group speaks the wire protocol with plain nats-py (not the project's
client) to ``veritech serve`` started as a real subprocess; the rest use an
in-process veritech and the project's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from conftest import StartVeritech, wait_until
from veritech.backends.process import default_runtime_root
from veritech.client import Client, make_request
from veritech.errors import NoResponders
from veritech.server.server import Veritech

VERITECH_BIN = Path(sys.executable).parent / "veritech"


# -- a plain NATS client ---------------------------------------------------------


async def raw_execute(
    nc: NATS, subject: str, payload: bytes, timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Publish ``payload`` with a reply inbox; every reply up to the result."""
    inbox = nc.new_inbox()
    queue: asyncio.Queue[Msg] = asyncio.Queue()
    subscription = await nc.subscribe(inbox, cb=queue.put)
    messages: list[dict[str, Any]] = []
    try:
        await nc.publish(subject, payload, reply=inbox)
        async with asyncio.timeout(timeout_s):
            while not messages or messages[-1]["type"] != "result":
                msg = await queue.get()
                messages.append(json.loads(msg.data))
    finally:
        await subscription.unsubscribe()
    return messages


def request_bytes(code: str, args: Any = None, **fields: Any) -> bytes:
    request = {
        "execution_id": f"acc-{uuid.uuid4().hex}",
        "handler": "main",
        "code": code,
        "args": args,
        **fields,
    }
    return json.dumps(request).encode()


# -- veritech serve as a subprocess --------------------------------------------------


@dataclass
class Served:
    process: asyncio.subprocess.Process
    instance: str
    log: Path

    async def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM by PID; the exit code."""
        if self.process.returncode is None:
            os.kill(self.process.pid, signal.SIGTERM)
        async with asyncio.timeout(timeout_s):
            return await self.process.wait()

    def instance_dirs(self) -> list[Path]:
        return sorted(default_runtime_root().glob(f"{self.instance}-*"))


async def _wait_serving(nc: NATS, prefix: str, pool_size: int) -> str:
    """The instance id, once it answers status with a full pool."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(
            nats.errors.NoRespondersError, nats.errors.TimeoutError
        ):
            reply = await nc.request(
                f"{prefix}veritech.control.status", b"{}", timeout=0.5
            )
            answer = json.loads(reply.data)
            if all(p["ready"] == pool_size for p in answer["pool"].values()):
                return str(answer["instance"])
        await asyncio.sleep(0.05)
    pytest.fail("veritech serve did not come up with a full pool within 60 s")


@pytest.fixture
async def served(
    nats_url: str, prefix: str, nc: NATS, tmp_path: Path
) -> AsyncIterator[Served]:
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            str(VERITECH_BIN),
            "serve",
            "--nats-url",
            nats_url,
            "--subject-prefix",
            prefix,
            "--pool-size",
            "2",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    try:
        instance = await _wait_serving(nc, prefix, 2)
        yield Served(process, instance, log)
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


KIND_CASES = [
    (
        "resolver",
        "function main(a) { console.log('resolving', a.name); return a.name + '!' }",
        {"name": "web"},
        "resolving web",
        "web!",
    ),
    (
        "qualification",
        "function main(a) { console.log('checking', a.port);"
        " return a.port === 22 ? {result: 'failure', message: 'ssh is open'}"
        " : {result: 'success'} }",
        {"port": 22},
        "checking 22",
        {"result": "failure", "message": "ssh is open"},
    ),
    (
        "action",
        "async function main(a) { console.log('restarting', a.id);"
        " return {status: 'ok', payload: {restarted: a.id}, message: 'done',"
        " resource_id: a.id} }",
        {"id": "i-1"},
        "restarting i-1",
        {
            "status": "ok",
            "payload": {"restarted": "i-1"},
            "message": "done",
            "resource_id": "i-1",
        },
    ),
    (
        "validation",
        "function main(v) { console.log('validating', v);"
        " return {valid: v.length <= 5, message: 'at most 5 characters'} }",
        "toolong",
        "validating toolong",
        {"valid": False, "message": "at most 5 characters"},
    ),
]


async def test_plain_nats_client_runs_every_kind_on_veritech_serve(
    served: Served, nc: NATS, prefix: str
) -> None:
    # 1. Every kind: accepted, the output line, one result; seq 0, 1, 2.
    for kind, code, args, line, data in KIND_CASES:
        payload = request_bytes(code, args)
        execution_id = json.loads(payload)["execution_id"]

        messages = await raw_execute(nc, f"{prefix}veritech.function.{kind}", payload)

        assert [m["type"] for m in messages] == ["accepted", "output", "result"], kind
        assert [m["seq"] for m in messages] == [0, 1, 2]
        assert all(m["execution_id"] == execution_id for m in messages)
        assert messages[0]["instance"] == served.instance
        assert (messages[1]["stream"], messages[1]["level"]) == ("stdout", "info")
        assert messages[1]["message"] == line
        result = messages[2]
        assert (result["status"], result["data"], result["unset"]) == (
            "success",
            data,
            False,
        ), kind
        assert set(result["stats"]) >= {"queue_ms", "run_ms"}

    # 2. SIGTERM: a clean exit that leaves no instance directory behind.
    await _wait_serving(nc, prefix, 2)
    assert len(served.instance_dirs()) >= 2
    assert await served.stop() == 0
    assert served.instance_dirs() == []
    assert "Traceback" not in served.log.read_text()


async def test_request_that_is_not_json_gets_invalid_request(
    served: Served, nc: NATS, prefix: str
) -> None:
    messages = await raw_execute(
        nc, f"{prefix}veritech.function.resolver", b"this is not json"
    )

    assert len(messages) == 1
    result = messages[0]
    assert (result["type"], result["status"], result["seq"]) == ("result", "failure", 0)
    assert result["execution_id"] == ""
    assert result["error"] == {
        "kind": "invalid_request",
        "message": "payload is not JSON: Expecting value",
    }


async def test_request_without_code_gets_invalid_request_with_its_id(
    served: Served, nc: NATS, prefix: str
) -> None:
    payload = json.dumps({"execution_id": "no-code-1", "handler": "main"}).encode()

    messages = await raw_execute(nc, f"{prefix}veritech.function.resolver", payload)

    assert len(messages) == 1
    result = messages[0]
    assert (result["type"], result["status"], result["seq"]) == ("result", "failure", 0)
    assert result["execution_id"] == "no-code-1"
    assert result["error"] == {
        "kind": "invalid_request",
        "message": "invalid request: code: field required",
    }


async def test_request_without_reply_subject_is_dropped_and_serving_goes_on(
    served: Served, nc: NATS, prefix: str
) -> None:
    subject = f"{prefix}veritech.function.resolver"
    await nc.publish(subject, request_bytes("function main() { return 1 }"))
    await nc.flush()

    messages = await raw_execute(
        nc, subject, request_bytes("function main() { return 2 }")
    )

    assert messages[-1]["status"] == "success"
    assert messages[-1]["data"] == 2
    dropped = f"request on {subject} without a reply subject dropped"
    await wait_until(
        lambda: dropped in served.log.read_text(), 10, "the drop to be logged"
    )


# -- the project's client, an in-process veritech --------------------------------------


async def test_no_veritech_listening_fails_at_once_with_no_responders(
    client: Client, prefix: str
) -> None:
    request = make_request("function main() { return 1 }", timeout_ms=10_000)
    started = time.monotonic()

    with pytest.raises(NoResponders) as raised:
        await client.run("resolver", request)

    # The client's own deadline is 10 s + its margin: this must come long before.
    assert time.monotonic() - started < 3.0
    assert str(raised.value) == (
        f"no veritech is listening on {prefix}veritech.function.resolver "
        "(is veritech serving this NATS with the same --subject-prefix?)"
    )
    assert raised.value.execution_id == request["execution_id"]


async def test_type_error_is_user_code_exception_named_type_error(
    veritech: Veritech, client: Client
) -> None:
    code = "function main() { const x = undefined; return x.y }"

    result = await client.run("resolver", make_request(code))

    assert result["status"] == "failure"
    assert result["error"] == {
        "kind": "user_code_exception",
        "name": "TypeError",
        "message": "Cannot read properties of undefined (reading 'y')",
    }


async def test_endless_loop_times_out_and_the_next_request_succeeds(
    veritech: Veritech, client: Client
) -> None:
    request = make_request("function main() { while (true) {} }", timeout_ms=1000)
    started = time.monotonic()

    result = await client.run("resolver", request)

    elapsed = time.monotonic() - started
    assert result["status"] == "failure"
    assert result["error"] == {
        "kind": "timeout",
        "message": "the function did not finish within its timeout of 1000 ms",
    }
    assert elapsed < 5.0, f"the timeout took {elapsed:.2f}s"
    after = await client.run("resolver", make_request("function main() { return 7 }"))
    assert (after["status"], after["data"]) == ("success", 7)


async def test_resolver_number_for_string_is_invalid_return_type(
    veritech: Veritech, client: Client
) -> None:
    request = make_request("function main() { return 42 }", response_type="string")

    result = await client.run("resolver", request)

    assert result["status"] == "failure"
    assert result["error"] == {
        "kind": "invalid_return_type",
        "message": "expected a value of type string, got integer",
    }


async def test_resolver_returning_null_is_success_unset(
    veritech: Veritech, client: Client
) -> None:
    request = make_request("function main() { return null }", response_type="string")

    result = await client.run("resolver", request)

    assert (result["status"], result["data"], result["unset"]) == (
        "success",
        None,
        True,
    )


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            "async function main() { return (await fetch(URL)).status }",
            'Requires net access to "127.0.0.1:PORT"',
        ),
        (
            "function main() { return Deno.readTextFileSync('/etc/passwd') }",
            'Requires read access to "/etc/passwd"',
        ),
        (
            "function main() { return Deno.env.get('HOME') }",
            'Requires env access to "HOME"',
        ),
    ],
    ids=["fetch-nats-port", "read-etc-passwd", "env-home"],
)
async def test_network_files_and_environment_are_refused(
    veritech: Veritech, client: Client, nats_url: str, code: str, message: str
) -> None:
    port = nats_url.rsplit(":", 1)[1]
    code = code.replace("URL", json.dumps(f"http://127.0.0.1:{port}"))

    result = await client.run("resolver", make_request(code))

    assert result["status"] == "failure"
    assert result["error"] == {
        "kind": "user_code_exception",
        "name": "NotCapable",
        "message": message.replace("PORT", port),
    }


async def test_200_requests_at_once_each_get_exactly_one_result(
    start_veritech: StartVeritech, nc: NATS, prefix: str
) -> None:
    veritech = await start_veritech(pool_size=4)
    inbox = nc.new_inbox()
    messages: dict[str, list[dict[str, Any]]] = defaultdict(list)

    async def collect(msg: Msg) -> None:
        document = json.loads(msg.data)
        messages[document["execution_id"]].append(document)

    subscription = await nc.subscribe(f"{inbox}.>", cb=collect)
    ids = [f"load-{i}" for i in range(200)]
    code = "function main(n) { console.log('n', n); return n * 2 }"

    async def send(i: int) -> None:
        request = {
            "execution_id": ids[i],
            "handler": "main",
            "code": code,
            "args": i,
            "timeout_ms": 120_000,
        }
        await nc.publish(
            f"{prefix}veritech.function.resolver",
            json.dumps(request).encode(),
            reply=f"{inbox}.{i}",
        )

    started = time.monotonic()
    await asyncio.gather(*(send(i) for i in range(200)))
    await nc.flush()

    def results() -> int:
        return sum(m["type"] == "result" for ms in messages.values() for m in ms)

    await wait_until(lambda: results() >= 200, 240, "200 results")
    elapsed = time.monotonic() - started
    # A round trip through the server: anything veritech sent before it is in.
    await nc.flush()
    await subscription.unsubscribe()

    assert sorted(messages) == sorted(ids)
    failures = Counter(
        f"{ms[-1]['error']['kind']}: {ms[-1]['error']['message']}"
        for ms in messages.values()
        if ms[-1].get("status") == "failure"
    )
    assert not failures, failures.most_common(5)
    for i, execution_id in enumerate(ids):
        stream = messages[execution_id]
        kinds = Counter(m["type"] for m in stream)
        assert kinds["result"] == 1, execution_id
        assert stream[-1]["type"] == "result"
        assert [m["seq"] for m in stream] == list(range(len(stream)))
        assert (stream[-1]["status"], stream[-1]["data"]) == ("success", 2 * i)
    await wait_until(
        lambda: all(s.ready == 4 for s in veritech.pool.status().values()),
        60,
        "the pool to be back to 4 ready",
    )
    print(f"200 executions on a pool of 4 in {elapsed:.1f}s")


TS_CODE = """
interface Input { count: number }
function main(input: Input): string {
  const doubled: number = input.count * 2;
  return `count ${doubled}`;
}
"""


@pytest.mark.parametrize(
    ("code", "language"),
    [
        (TS_CODE, "typescript"),
        (TS_CODE.replace("function main", "export function main"), "typescript"),
        ("function main(input) { return `count ${input.count * 2}` }", "javascript"),
        (
            "export function main(input) { return `count ${input.count * 2}` }",
            "javascript",
        ),
    ],
    ids=["ts-plain", "ts-export", "js-plain", "js-export"],
)
async def test_handler_as_plain_or_exported_function_in_js_and_ts(
    veritech: Veritech, client: Client, code: str, language: str
) -> None:
    request = make_request(code, args={"count": 21}, language=language)

    result = await client.run("resolver", request)

    assert (result["status"], result["data"]) == ("success", "count 42"), result


async def test_missing_handler_is_handler_not_found(
    veritech: Veritech, client: Client
) -> None:
    request = make_request("function other() { return 1 }", handler="main")

    result = await client.run("resolver", request)

    assert result["status"] == "failure"
    assert result["error"] == {
        "kind": "user_code_exception",
        "name": "HandlerNotFound",
        "message": "handler 'main' is not defined at the top level of the code",
    }


@pytest.mark.parametrize("language", ["javascript", "typescript"])
async def test_syntax_error_is_user_code_exception_named_syntax_error(
    veritech: Veritech, client: Client, language: str
) -> None:
    request = make_request("function main( { return 1 }", language=language)

    result = await client.run("resolver", request)

    assert result["status"] == "failure"
    assert result["error"]["kind"] == "user_code_exception"
    assert result["error"]["name"] == "SyntaxError"
    assert result["error"]["message"]


async def test_qualification_failure_without_message_is_invalid_return_type(
    veritech: Veritech, client: Client
) -> None:
    code = "function main() { return { result: 'failure' } }"

    result = await client.run("qualification", make_request(code))

    assert result["status"] == "failure"
    assert result["error"] == {
        "kind": "invalid_return_type",
        "message": "a qualification with result 'failure' must carry a 'message'",
    }


async def test_action_that_throws_is_success_with_status_error(
    veritech: Veritech, client: Client
) -> None:
    code = "async function main() { throw new Error('the API said 503') }"

    result = await client.run("action", make_request(code))

    assert result["status"] == "success"
    assert result["data"] == {"status": "error", "message": "the API said 503"}


async def test_validation_returns_valid_false_with_message(
    veritech: Veritech, client: Client
) -> None:
    code = "function main(v) { return { valid: false, message: `${v} is taken` } }"

    result = await client.run("validation", make_request(code, args="admin"))

    assert result["status"] == "success"
    assert result["data"] == {"valid": False, "message": "admin is taken"}
