"""Limits with clear errors: output, result size, request size, memory, time."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from conftest import StartVeritech
from veritech.client import Client, make_request
from veritech.cyclone.runner import data_limit_bytes
from veritech.errors import RequestTooLarge
from veritech.natsd import open_nats_server
from veritech.server.relay import OutputLimits
from veritech.server.server import Veritech

SMALL_PAYLOAD = 64 * 1024


async def run(client: Client, code: str, **fields: Any) -> list[dict[str, Any]]:
    request = make_request(code, **fields)
    return [m async for m in client.execute("resolver", request)]


def outputs(messages: list[dict[str, Any]]) -> list[str]:
    return [m["message"] for m in messages if m["type"] == "output"]


def only_result(messages: list[dict[str, Any]]) -> dict[str, Any]:
    results = [m for m in messages if m["type"] == "result"]
    assert len(results) == 1 and messages[-1] is results[0]
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    return results[0]


async def assert_serves_next(client: Client) -> None:
    result = await client.run("resolver", make_request("function main() { return 5 }"))
    assert (result["status"], result["data"]) == ("success", 5)


# -- output ---------------------------------------------------------------------


async def test_too_many_output_lines_are_cut_and_fail_the_execution(
    start_veritech: StartVeritech, client: Client
) -> None:
    await start_veritech(output=OutputLimits(max_lines=5, max_line_bytes=1000))
    code = """function main() {
        for (let i = 0; i < 50; i++) console.log('line ' + i);
        return 1;
    }"""

    messages = await run(client, code)

    assert outputs(messages) == [
        "line 0",
        "line 1",
        "line 2",
        "line 3",
        "line 4",
        "[veritech] output cut: the function wrote more than 5 output lines",
    ]
    notice = [m for m in messages if m["type"] == "output"][-1]
    assert (notice["stream"], notice["level"]) == ("stderr", "error")
    assert only_result(messages)["error"] == {
        "kind": "output_limit_exceeded",
        "message": "the function wrote more than 5 output lines; "
        "the execution was stopped",
    }
    await assert_serves_next(client)


async def test_exactly_the_line_limit_is_fine(
    start_veritech: StartVeritech, client: Client
) -> None:
    await start_veritech(output=OutputLimits(max_lines=5, max_line_bytes=1000))
    code = "function main() { for (let i = 0; i < 5; i++) console.log(i); return 1 }"

    messages = await run(client, code)

    assert outputs(messages) == ["0", "1", "2", "3", "4"]
    assert only_result(messages)["status"] == "success"


async def test_a_long_output_line_is_cut_and_fails_the_execution(
    start_veritech: StartVeritech, client: Client
) -> None:
    await start_veritech(output=OutputLimits(max_lines=100, max_line_bytes=100))
    code = (
        "function main() { console.log('ok'); console.log('é'.repeat(300)); return 1 }"
    )

    messages = await run(client, code)

    # 100 bytes of two-byte characters: 50 whole ones.
    assert outputs(messages) == [
        "ok",
        "é" * 50,
        "[veritech] output cut: the function wrote an output line longer than "
        "100 bytes",
    ]
    assert only_result(messages)["error"] == {
        "kind": "output_limit_exceeded",
        "message": "the function wrote an output line longer than 100 bytes; "
        "the execution was stopped",
    }
    await assert_serves_next(client)


async def test_output_past_the_limit_stops_a_function_that_keeps_printing(
    start_veritech: StartVeritech, client: Client
) -> None:
    await start_veritech(output=OutputLimits(max_lines=3, max_line_bytes=1000))

    messages = await run(
        client, "function main() { while (true) console.log('x') }", timeout_ms=60_000
    )

    assert len(outputs(messages)) == 4
    assert only_result(messages)["error"]["kind"] == "output_limit_exceeded"
    await assert_serves_next(client)


# -- result and request size ------------------------------------------------


@pytest.fixture
async def small_nats() -> AsyncIterator[str]:
    async with open_nats_server(max_payload=SMALL_PAYLOAD) as url:
        yield url


@pytest.fixture
async def small_nc(small_nats: str) -> AsyncIterator[NATS]:
    connection = await nats.connect(small_nats)
    yield connection
    await connection.close()


async def test_a_result_larger_than_max_payload_is_result_too_large(
    start_veritech: StartVeritech,
    small_nats: str,
    small_nc: NATS,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    await start_veritech(nats_url=small_nats)
    client = Client(small_nc, subject_prefix=prefix, heartbeat_interval_s=1.0)
    assert small_nc.max_payload == SMALL_PAYLOAD

    messages = await run(client, "function main() { return 'x'.repeat(200 * 1024) }")

    result = only_result(messages)
    assert result["status"] == "failure"
    assert result["error"]["kind"] == "result_too_large"
    match = re.fullmatch(
        r"the result is (\d+) bytes, more than the NATS max_payload of 65536 bytes",
        result["error"]["message"],
    )
    assert match is not None and int(match[1]) > 200 * 1024
    await assert_serves_next(client)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_long_output_line_is_cut_to_fit_max_payload(
    start_veritech: StartVeritech,
    small_nats: str,
    small_nc: NATS,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    # The configured line limit (64 KiB) does not fit a 64 KiB NATS message.
    await start_veritech(nats_url=small_nats)
    client = Client(small_nc, subject_prefix=prefix, heartbeat_interval_s=1.0)

    messages = await run(
        client, "function main() { console.log('\\u0001'.repeat(60000)); return 1 }"
    )

    lines = outputs(messages)
    assert len(lines) == 2
    assert len(lines[0]) > 0 and set(lines[0]) == {"\x01"}
    assert lines[1] == (
        "[veritech] output cut: the function wrote an output line longer than "
        f"{SMALL_PAYLOAD - 1024} bytes"
    )
    assert only_result(messages)["error"]["kind"] == "output_limit_exceeded"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_request_larger_than_max_payload_is_refused_before_sending(
    start_veritech: StartVeritech, small_nats: str, small_nc: NATS, prefix: str
) -> None:
    server = await start_veritech(nats_url=small_nats)
    client = Client(small_nc, subject_prefix=prefix, heartbeat_interval_s=1.0)
    seen: list[Msg] = []

    async def spy(msg: Msg) -> None:
        seen.append(msg)

    await small_nc.subscribe(f"{prefix}veritech.function.>", cb=spy)
    request = make_request("function main() { return 1 }", args="y" * 100_000)
    size = len(json.dumps(request, ensure_ascii=False).encode())

    with pytest.raises(RequestTooLarge) as caught:
        await client.run("resolver", request)

    assert str(caught.value) == (
        f"the request is {size} bytes, more than the NATS max_payload of 65536 bytes"
    )
    assert (caught.value.size, caught.value.limit) == (size, SMALL_PAYLOAD)
    await small_nc.flush()
    await assert_serves_next(client)
    # Only the follow-up request crossed NATS.
    assert len(seen) == 1
    assert server.status()["running"] == 0


# -- memory (process backend) -----------------------------------------------


async def test_a_heap_hog_is_out_of_memory(
    start_veritech: StartVeritech, client: Client
) -> None:
    await start_veritech(memory_mb=64, pool_size=1)
    code = """function main() {
        const keep = [];
        while (true) keep.push(new Array(100000).fill({ x: Math.random() }));
    }"""

    messages = await run(client, code, timeout_ms=60_000)

    assert only_result(messages)["error"] == {
        "kind": "out_of_memory",
        "message": "the function ran out of memory (limit 64 MiB of heap)",
    }
    await assert_serves_next(client)


async def test_huge_array_buffers_outside_the_heap_are_out_of_memory(
    start_veritech: StartVeritech, client: Client
) -> None:
    await start_veritech(memory_mb=64, pool_size=1)
    # 100 MiB at a time, kept and touched: without a bound this takes the host's
    # memory; with it the runner's RLIMIT_DATA stops it.
    code = """function main() {
        const keep = [];
        for (let i = 0; i < 200; i++) {
            const bytes = new Uint8Array(100 * 1024 * 1024);
            bytes.fill(1);
            keep.push(bytes);
        }
        return keep.length;
    }"""

    messages = await run(client, code, timeout_ms=60_000)

    assert only_result(messages)["error"] == {
        "kind": "out_of_memory",
        "message": "the function ran out of memory: an ArrayBuffer allocation "
        "failed (limit 64 MiB outside the heap)",
    }
    await assert_serves_next(client)


async def test_one_huge_array_buffer_is_out_of_memory(
    start_veritech: StartVeritech, client: Client
) -> None:
    await start_veritech(memory_mb=64, pool_size=1)

    messages = await run(
        client, "function main() { return new ArrayBuffer(2 ** 32).byteLength }"
    )

    assert only_result(messages)["error"]["kind"] == "out_of_memory"


def test_the_runner_data_limit_is_heap_twice_plus_the_runtime_reserve() -> None:
    assert data_limit_bytes(256) == (2 * 256 + 640) * 1024 * 1024


# -- time -------------------------------------------------------------------


async def test_cyclone_timeout_fires_first_and_says_the_limit(
    start_veritech: StartVeritech, client: Client
) -> None:
    await start_veritech(pool_size=1)

    messages = await run(client, "function main() { while (true) {} }", timeout_ms=1000)

    assert only_result(messages)["error"] == {
        "kind": "timeout",
        "message": "the function did not finish within its timeout of 1000 ms",
    }
    await assert_serves_next(client)


async def test_a_timeout_above_the_maximum_is_clamped_to_it(
    start_veritech: StartVeritech, client: Client
) -> None:
    server = await start_veritech(pool_size=1, max_timeout_ms=1500)
    assert server.config.effective_timeout_ms(60_000) == 1500
    assert server.config.effective_timeout_ms(None) == 1500

    messages = await run(
        client, "function main() { while (true) {} }", timeout_ms=60_000
    )

    assert only_result(messages)["error"] == {
        "kind": "timeout",
        "message": "the function did not finish within its timeout of 1500 ms",
    }


async def test_nested_deadlines_grow_outwards(
    veritech: Veritech, client: Client
) -> None:
    # cyclone (and its runner) get the execution's timeout; veritech's
    # backstop adds its grace; the client adds its margin on top.
    config = veritech.config
    assert config.timeout_grace_s > 0
    assert client.deadline_margin_s > config.timeout_grace_s
