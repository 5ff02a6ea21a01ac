"""Shared fixtures: a real nats-server on a free port, a random subject prefix
per test, and veritech servers started in-process on the process backend."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from veritech.client import Client
from veritech.natsd import open_nats_server
from veritech.server.config import VeritechConfig
from veritech.server.server import Veritech, open_veritech


@pytest.fixture
async def nats_url() -> AsyncIterator[str]:
    async with open_nats_server() as url:
        yield url


@pytest.fixture
def prefix() -> str:
    return f"t{secrets.token_hex(4)}."


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    connection = await nats.connect(nats_url)
    yield connection
    await connection.close()


StartVeritech = Callable[..., Awaitable[Veritech]]


@pytest.fixture
async def start_veritech(nats_url: str, prefix: str) -> AsyncIterator[StartVeritech]:
    """Start veritech servers (closed at teardown); options override config."""
    async with AsyncExitStack() as stack:

        async def start(**options: Any) -> Veritech:
            wait_full = options.pop("wait_full", True)
            config = VeritechConfig(
                nats_url=options.pop("nats_url", nats_url),
                subject_prefix=prefix,
                pool_size=options.pop("pool_size", 2),
                heartbeat_interval_s=options.pop("heartbeat_interval_s", 1.0),
                shutdown_grace_s=options.pop("shutdown_grace_s", 1.0),
                **options,
            )
            server = await stack.enter_async_context(open_veritech(config))
            if wait_full:
                await server.pool.wait_full(60)
            return server

        yield start


@pytest.fixture
async def veritech(start_veritech: StartVeritech) -> Veritech:
    return await start_veritech()


@pytest.fixture
def client(nc: NATS, prefix: str) -> Client:
    return Client(nc, subject_prefix=prefix, heartbeat_interval_s=1.0)


async def wait_until(
    condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition"
) -> None:
    """Poll ``condition`` until true; fail the test at the deadline."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
