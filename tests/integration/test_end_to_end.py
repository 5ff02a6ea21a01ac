"""The main job through the whole stack: client, NATS, veritech, cyclone, Deno."""

from __future__ import annotations

import json

from veritech.client import Client, make_request
from veritech.server.server import Veritech


async def test_resolver_output_and_result_arrive_in_order(
    veritech: Veritech, client: Client
) -> None:
    code = (
        "function main(a) { console.log('got', a); console.warn('careful');"
        " return a.x * 2 }"
    )
    request = make_request(code, args={"x": 21})

    messages = [m async for m in client.execute("resolver", request)]

    assert [m["type"] for m in messages] == ["accepted", "output", "output", "result"]
    assert [m["seq"] for m in messages] == [0, 1, 2, 3]
    assert messages[0]["instance"] == veritech.id
    assert messages[1]["message"] == 'got {"x":21}'
    assert (messages[1]["stream"], messages[1]["level"]) == ("stdout", "info")
    assert (messages[2]["stream"], messages[2]["level"]) == ("stderr", "warn")
    result = messages[-1]
    assert (result["status"], result["data"], result["unset"]) == ("success", 42, False)
    assert set(result["stats"]) >= {"queue_ms", "run_ms"}
    assert all(m["execution_id"] == request["execution_id"] for m in messages)


async def test_type_error_is_a_user_code_exception_named_type_error(
    veritech: Veritech, client: Client
) -> None:
    result = await client.run("resolver", make_request("function main() { null.x }"))

    assert result["status"] == "failure"
    assert result["error"]["kind"] == "user_code_exception"
    assert result["error"]["name"] == "TypeError"
    assert result["error"]["message"] == "Cannot read properties of null (reading 'x')"


async def test_pool_is_refilled_after_single_use(
    veritech: Veritech, client: Client
) -> None:
    result = await client.run("resolver", make_request("function main() { return 1 }"))
    assert result["status"] == "success"

    await veritech.pool.wait_full(60)
    status = veritech.status()
    assert status["pool"]["local"]["ready"] == 2
    assert json.loads(json.dumps(status))["running"] == 0
