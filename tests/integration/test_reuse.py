"""Instances serving several executions (executions_per_instance > 1)."""

from __future__ import annotations

from conftest import StartVeritech, wait_until
from veritech.client import Client, make_request


async def test_single_use_starts_one_instance_per_execution(
    start_veritech: StartVeritech, client: Client
) -> None:
    server = await start_veritech(pool_size=1)

    for n in range(3):
        result = await client.run(
            "resolver", make_request(f"function main() {{ return {n} }}")
        )
        assert result["data"] == n
    await server.pool.wait_full(60)

    assert server.pool.status()["local"].started == 4


async def test_reused_instance_serves_several_executions_each_in_a_fresh_runner(
    start_veritech: StartVeritech, client: Client
) -> None:
    server = await start_veritech(pool_size=1, executions_per_instance=3)
    # Each execution sets a global and reports what the runner held before:
    # a fresh runner per execution means nothing carries over.
    code = (
        "function main() { const seen = globalThis.mark ?? null;"
        " globalThis.mark = 1; return seen }"
    )

    results = [await client.run("resolver", make_request(code)) for _ in range(6)]

    assert [r["status"] for r in results] == ["success"] * 6
    assert all(r["unset"] for r in results)
    await server.pool.wait_full(60)
    # Six executions, three per instance: two instances used, plus the one
    # waiting now.
    assert server.pool.status()["local"].started == 3


async def test_reused_instance_is_discarded_after_it_was_killed(
    start_veritech: StartVeritech, client: Client
) -> None:
    server = await start_veritech(pool_size=1, executions_per_instance=5)
    request = make_request("function main() { while (true) {} }", timeout_ms=60_000)

    execution = client.execute("resolver", request)
    accepted = await anext(execution)
    assert accepted["type"] == "accepted"
    await wait_until(
        lambda: server.status()["running"] == 1, what="the execution to run"
    )
    await wait_until(
        lambda: server.pool.status()["local"].ready == 0,
        what="the instance to be taken",
    )
    assert await client.kill(request["execution_id"])
    messages = [m async for m in execution]

    assert messages[-1]["error"]["kind"] == "killed"
    result = await client.run("resolver", make_request("function main() { return 7 }"))
    assert result["data"] == 7
    await server.pool.wait_full(60)
    assert server.pool.status()["local"].started == 2
