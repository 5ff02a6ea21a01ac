"""Fixtures for the docker backend's tests: a real engine and the cyclone image.

Without an engine or the image these tests are skipped with the reason, except
under CI (CI=true) or when the test script has provided both
(VERITECH_DOCKER=1): there a missing engine is a failure, never a skip.

Every veritech a test starts gets a known instance id; after the test no
container labelled with one of those ids may remain (checked with the docker
CLI, an independent view), nor its socket directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from veritech.backends.docker import (
    OWNER_LABEL,
    DockerInstance,
    default_image_ref,
    default_runtime_root,
)
from veritech.server.config import DockerSettings, VeritechConfig
from veritech.server.server import Veritech, open_veritech

IMAGE = default_image_ref()


def must_not_skip() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("VERITECH_DOCKER") == "1"


def docker_cli(*args: str, check: bool = True, timeout: float = 60) -> str:
    """Run the docker CLI; its stdout, stripped."""
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


async def adocker(*args: str, check: bool = True, limit_s: float = 120) -> str:
    """docker_cli off the event loop, so veritech keeps running meanwhile."""
    return await asyncio.to_thread(docker_cli, *args, check=check, timeout=limit_s)


def image_present(reference: str) -> bool:
    done = subprocess.run(
        ["docker", "image", "inspect", reference],
        capture_output=True,
        timeout=60,
    )
    return done.returncode == 0


def _why_unavailable() -> str | None:
    try:
        done = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the docker CLI cannot be run: {exc}"
    if done.returncode != 0:
        return f"no Docker engine answers: {done.stderr.strip()[:300]}"
    if not image_present(IMAGE):
        return (
            f"the cyclone image {IMAGE} is not built (run `veritech image build`, "
            "or scripts/test.sh, which does)"
        )
    return None


@pytest.fixture(scope="session")
def docker_engine() -> None:
    why = _why_unavailable()
    if why is None:
        return
    if must_not_skip():
        pytest.fail(f"docker tests cannot run: {why} (CI/VERITECH_DOCKER demand them)")
    pytest.skip(f"docker tests skipped: {why}")


def containers_of(owner: str) -> list[str]:
    out = docker_cli("ps", "-aq", "--filter", f"label={OWNER_LABEL}={owner}")
    return out.split()


@pytest.fixture(autouse=True)
def docker_owners(docker_engine: None) -> Any:
    """Owner ids used by the test; nothing of theirs may outlive it."""
    owners: list[str] = []
    yield owners
    leftovers = {owner: containers_of(owner) for owner in owners}
    for ids in leftovers.values():
        if ids:
            docker_cli("rm", "-f", *ids, check=False)
    dirs = [o for o in owners if (default_runtime_root() / o).exists()]
    assert not any(leftovers.values()), f"containers left behind: {leftovers}"
    assert not dirs, f"socket directories left behind: {dirs}"


def new_owner(owners: list[str]) -> str:
    owner = f"dt-{secrets.token_hex(4)}"
    owners.append(owner)
    return owner


StartDockerVeritech = Callable[..., Awaitable[Veritech]]


@pytest.fixture
async def start_docker_veritech(
    nats_url: str, prefix: str, docker_owners: list[str]
) -> AsyncIterator[StartDockerVeritech]:
    """Start docker-backed veritechs (closed at teardown).

    Keyword options: ``docker`` (DockerSettings fields as a dict), ``wait_full``,
    and any VeritechConfig field.
    """
    async with AsyncExitStack() as stack:

        async def start(**options: Any) -> Veritech:
            wait_full = options.pop("wait_full", True)
            settings = DockerSettings(**options.pop("docker", {}))
            config = VeritechConfig(
                nats_url=nats_url,
                subject_prefix=options.pop("subject_prefix", prefix),
                backend="docker",
                pool_size=options.pop("pool_size", 1),
                heartbeat_interval_s=options.pop("heartbeat_interval_s", 1.0),
                shutdown_grace_s=options.pop("shutdown_grace_s", 1.0),
                instance_id=new_owner(docker_owners),
                docker=settings,
                **options,
            )
            server = await stack.enter_async_context(open_veritech(config))
            if wait_full:
                await server.pool.wait_full(120)
            return server

        yield start


@pytest.fixture
async def docker_veritech(start_docker_veritech: StartDockerVeritech) -> Veritech:
    return await start_docker_veritech()


def inspect(container: str) -> dict[str, Any]:
    document = json.loads(docker_cli("inspect", container))
    assert isinstance(document, list) and len(document) == 1
    result: dict[str, Any] = document[0]
    return result


async def ready_container(server: Veritech) -> str:
    """The container id of a ready instance in the server's default pool."""
    await server.pool.wait_full(60)
    pool = server.pool._pools[server.backend.default_image()]
    instance = pool._ready[0]
    assert isinstance(instance, DockerInstance) and instance.alive
    return instance.container_id
