"""A bounded soak: many executions from several clients against a small pool.

Every execution must get exactly one result (none lost, none duplicated), the
pool must return to full, and veritech's memory and open file count must not
grow with the number of executions. The default count keeps the test within
about two minutes on two cores: each execution starts a fresh sandboxed
instance (single use), so the instance start is what bounds the throughput.
A second run reuses instances (25 executions each, a fresh Deno runner per
execution) and so reaches thousands of executions in the same bound. Set
VERITECH_SOAK_EXECUTIONS / VERITECH_SOAK_REUSED_EXECUTIONS for longer runs;
docs/performance.md records the figures.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from conftest import StartVeritech, wait_until
from veritech.client import make_request

EXECUTIONS = int(os.environ.get("VERITECH_SOAK_EXECUTIONS", "200"))
REUSED_EXECUTIONS = int(os.environ.get("VERITECH_SOAK_REUSED_EXECUTIONS", "2000"))
WARM_UP = 40
CLIENTS = 4
IN_FLIGHT_PER_CLIENT = 3
POOL_SIZE = 4
# veritech's RSS may grow by a fixed slack (CPython keeps freed arenas, the
# collected replies live in this process too) plus a little per execution.
# A backend that kept every spent instance (its aiohttp session, subprocess
# transport) grew by about 22 KiB per execution, far past this bound.
RSS_SLACK_KIB = 3 * 1024
RSS_PER_EXECUTION_KIB = 2
FD_GROWTH_LIMIT = 16

CODE = "function main(n) { console.log('n =', n); return n * 2 }"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Reply(NamedTuple):
    """What the checks need of one reply message (kept small: this process's
    RSS is measured, and the replies of every execution are kept)."""

    type: str
    seq: int
    value: Any  # an output's message, a result's status and data


class Collector:
    """Every reply message of every execution, by execution_id, as received."""

    def __init__(self) -> None:
        self.messages: dict[str, list[Reply]] = defaultdict(list)
        self.results = 0
        self._done: dict[str, asyncio.Future[None]] = {}

    async def on_message(self, msg: Msg) -> None:
        message = json.loads(msg.data)
        value = (message.get("status"), message.get("data"), message.get("message"))
        reply = Reply(message["type"], message["seq"], value)
        self.messages[message["execution_id"]].append(reply)
        if message["type"] == "result":
            self.results += 1
            done = self._done.get(message["execution_id"])
            if done is not None and not done.done():
                done.set_result(None)

    def expect(self, execution_id: str) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._done[execution_id] = future
        return future


async def run_batch(
    connections: list[NATS], prefix: str, collector: Collector, ids: list[str]
) -> None:
    """Send ``ids`` from all connections, a few in flight on each at a time."""
    todo = list(enumerate(ids))

    async def one_lane(nc: NATS, lane: int) -> None:
        inbox_root = f"_INBOX.soak{lane}"
        while todo:
            n, execution_id = todo.pop()
            request = make_request(
                CODE, args=n, execution_id=execution_id, timeout_ms=60_000
            )
            done = collector.expect(execution_id)
            await nc.publish(
                f"{prefix}veritech.function.resolver",
                json.dumps(request).encode(),
                reply=f"{inbox_root}.{execution_id}",
            )
            async with asyncio.timeout(90):
                await done

    lanes = [
        one_lane(nc, i)
        for i, nc in enumerate(connections)
        for _ in range(IN_FLIGHT_PER_CLIENT)
    ]
    await asyncio.gather(*lanes)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("executions", "executions_per_instance"),
    [
        pytest.param(EXECUTIONS, 1, id="single-use"),
        # Reused instances cost a Deno start per execution rather than an
        # instance start, which is what makes thousands fit in the bound.
        pytest.param(REUSED_EXECUTIONS, 25, id="reused"),
    ],
)
async def test_soak_every_execution_gets_exactly_one_result_and_nothing_leaks(
    start_veritech: StartVeritech,
    nats_url: str,
    prefix: str,
    executions: int,
    executions_per_instance: int,
) -> None:
    # 1. One veritech with a small pool; several clients, each on its own
    #    connection, listening on its own inbox tree.
    veritech = await start_veritech(
        pool_size=POOL_SIZE,
        heartbeat_interval_s=1.0,
        executions_per_instance=executions_per_instance,
    )
    collector = Collector()
    connections = [await nats.connect(nats_url) for _ in range(CLIENTS)]
    try:
        for i, nc in enumerate(connections):
            await nc.subscribe(
                f"_INBOX.soak{i}.>",
                cb=collector.on_message,
                pending_msgs_limit=1_000_000,
            )
            await nc.flush()

        # 2. Warm up (imports, caches, connection buffers), then take the
        #    baseline with a full pool.
        warm = [f"warm-{i}" for i in range(WARM_UP)]
        await run_batch(connections, prefix, collector, warm)
        await veritech.pool.wait_full(60)
        await wait_until(lambda: veritech.status()["running"] == 0, 30, "idle")
        gc.collect()
        rss_before, fds_before = rss_kib(), open_fds()

        # 3. The soak itself.
        ids = [f"soak-{i}" for i in range(executions)]
        started = time.monotonic()
        await run_batch(connections, prefix, collector, ids)
        duration = time.monotonic() - started

        # 4. Back to rest: pool full, nothing running. A status round trip on
        #    every connection comes after anything veritech published before it
        #    on that connection, so a late duplicate would have arrived by now.
        await veritech.pool.wait_full(60)
        await wait_until(lambda: veritech.status()["running"] == 0, 30, "idle")
        for nc in connections:
            await nc.request(f"{prefix}veritech.control.status", b"{}", timeout=10)
        gc.collect()
        rss_after, fds_after = rss_kib(), open_fds()
    finally:
        for nc in connections:
            await nc.close()

    # 5. Count: exactly one result per execution, last, with gapless seq.
    lost = [i for i in ids if not collector.messages.get(i)]
    duplicates = 0
    for n, execution_id in enumerate(ids):
        messages = collector.messages.get(execution_id, [])
        results = [m for m in messages if m.type == "result"]
        duplicates += max(len(results) - 1, 0)
        if not messages:
            continue
        assert [m.seq for m in messages] == list(range(len(messages)))
        assert messages[0].type == "accepted"
        assert messages[-1].type == "result"
        assert messages[-1].value[:2] == ("success", 2 * n), messages[-1]
        assert [m.value[2] for m in messages if m.type == "output"] == [f"n = {n}"]

    print(
        f"\nsoak: {executions} executions "
        f"({executions_per_instance} per instance) from {CLIENTS} clients "
        f"({CLIENTS * IN_FLIGHT_PER_CLIENT} in flight) on a pool of {POOL_SIZE} "
        f"in {duration:.1f}s ({executions / duration:.1f}/s); "
        f"results lost {len(lost)}, duplicates {duplicates}; "
        f"RSS {rss_before} KiB -> {rss_after} KiB; "
        f"fds {fds_before} -> {fds_after}"
    )
    assert lost == []
    assert duplicates == 0
    pool = veritech.status()["pool"]["local"]
    assert (pool["ready"], pool["size"], pool["starting"]) == (POOL_SIZE, POOL_SIZE, 0)
    assert rss_after - rss_before < RSS_SLACK_KIB + RSS_PER_EXECUTION_KIB * executions
    assert fds_after - fds_before <= FD_GROWTH_LIMIT
