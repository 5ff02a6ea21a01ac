"""Containers come and go with their executions, and with veritech itself."""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
import time
from typing import Any

import pytest

from conftest import wait_until
from veritech.backends.docker import (
    DockerBackend,
    DockerInstance,
    default_runtime_root,
)
from veritech.client import Client, make_request
from veritech.server.config import DockerSettings

from .conftest import StartDockerVeritech, adocker, containers_of, new_owner

pytestmark = pytest.mark.docker


async def test_single_use_container_and_its_socket_directory_are_removed(
    start_docker_veritech: StartDockerVeritech, client: Client
) -> None:
    server = await start_docker_veritech()
    backend = server.backend
    assert isinstance(backend, DockerBackend)
    (used,) = backend._instances.values()

    result = await client.run("resolver", make_request("function main() { return 1 }"))

    assert result["data"] == 1
    await wait_until(lambda: used.container_id not in backend._instances, 30)
    assert not used.socket_dir.exists()
    assert await adocker("ps", "-aq", "--filter", f"id={used.container_id}") == ""


async def test_container_killed_from_outside_mid_execution_is_a_failure(
    start_docker_veritech: StartDockerVeritech, client: Client
) -> None:
    server = await start_docker_veritech()
    request = make_request(
        "function main() { console.log('looping'); while (true) {} }",
        timeout_ms=120_000,
    )
    started = time.monotonic()

    messages: list[dict[str, Any]] = []
    async for message in client.execute("resolver", request):
        messages.append(message)
        if message["type"] == "output":
            execution = server._running[request["execution_id"]]
            instance = execution.instance
            assert isinstance(instance, DockerInstance)
            await adocker("kill", instance.container_id)

    result = messages[-1]
    assert result["status"] == "failure"
    assert result["error"] == {
        "kind": "internal",
        "message": "the instance ended the session before a result: "
        "the container was killed (exit code 137, SIGKILL from outside)",
    }
    # Far under the execution's timeout: the broken session ends it.
    assert time.monotonic() - started < 60


async def test_timeout_kills_the_container(
    start_docker_veritech: StartDockerVeritech, client: Client
) -> None:
    await start_docker_veritech()
    request = make_request("function main() { while (true) {} }", timeout_ms=1500)

    result = await client.run("resolver", request)

    assert result["error"]["kind"] == "timeout"


async def test_shutdown_removes_every_container_it_owns(
    start_docker_veritech: StartDockerVeritech,
) -> None:
    server = await start_docker_veritech(pool_size=3)
    assert len(await asyncio.to_thread(containers_of, server.id)) == 3

    await server.aclose()

    assert await asyncio.to_thread(containers_of, server.id) == []
    assert not (default_runtime_root() / server.id).exists()


async def test_sigkilled_veritech_leaves_containers_that_the_next_start_removes(
    nats_url: str, docker_owners: list[str]
) -> None:
    # 1. A veritech of its own process, with two ready containers.
    owner = new_owner(docker_owners)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "veritech.cli.veritech_cli",
        "serve",
        "--backend",
        "docker",
        "--nats-url",
        nats_url,
        "--subject-prefix",
        f"t{secrets.token_hex(4)}.",
        "--pool-size",
        "2",
        "--instance-id",
        owner,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(await asyncio.to_thread(containers_of, owner)) < 2:
            assert process.returncode is None, "veritech serve exited"
            assert time.monotonic() < deadline, "no containers within 120 s"
            await asyncio.sleep(0.1)

        # 2. Killed without a chance to clean up: its containers stay.
        process.send_signal(signal.SIGKILL)
        await process.wait()
        left = await asyncio.to_thread(containers_of, owner)
        assert len(left) == 2
        assert (default_runtime_root() / owner).is_dir()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    # 3. The next veritech to start on this host sweeps them away.
    successor = DockerBackend(new_owner(docker_owners), DockerSettings())
    await successor.start()
    try:
        assert await asyncio.to_thread(containers_of, owner) == []
        assert not (default_runtime_root() / owner).exists()
    finally:
        await successor.aclose()


async def test_containers_of_a_live_veritech_are_not_swept(
    start_docker_veritech: StartDockerVeritech, docker_owners: list[str]
) -> None:
    server = await start_docker_veritech(pool_size=2)

    other = DockerBackend(new_owner(docker_owners), DockerSettings())
    await other.start()
    await other.aclose()

    assert len(await asyncio.to_thread(containers_of, server.id)) == 2
    assert server.pool.status()[server.backend.default_image()].ready == 2
