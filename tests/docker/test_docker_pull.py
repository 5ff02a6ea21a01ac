"""Images are pulled when absent, from a real registry on 127.0.0.1."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from veritech.client import Client, make_request

from .conftest import (
    IMAGE,
    StartDockerVeritech,
    adocker,
    image_present,
    must_not_skip,
)

pytestmark = pytest.mark.docker

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A docker-registry on 127.0.0.1:<free port>, storage in tmp_path."""
    if shutil.which(REGISTRY_BIN) is None:
        why = f"{REGISTRY_BIN} is not installed (Debian's docker-registry)"
        if must_not_skip():
            pytest.fail(why)
        pytest.skip(why)
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {tmp_path / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    with (tmp_path / "registry.log").open("wb") as log:
        process = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while not _answers(f"http://127.0.0.1:{port}/v2/"):
            assert process.poll() is None, (tmp_path / "registry.log").read_text()
            assert time.monotonic() < deadline, "the registry did not answer in 30 s"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_image_absent_locally_is_pulled_from_the_registry(
    start_docker_veritech: StartDockerVeritech, client: Client, registry: str
) -> None:
    # 1. The cyclone image is in the registry, and not here under that name.
    repository = f"{registry}/veritech/cyclone"
    reference = f"{repository}:pulltest"
    await adocker("tag", IMAGE, reference)
    try:
        await adocker("push", reference, limit_s=300)
        await adocker("rmi", reference)
        assert not image_present(reference)

        # 2. A request naming it runs after veritech pulls it.
        await start_docker_veritech()
        request = make_request(
            "function main() { return 'pulled' }",
            container_image=repository,
            container_tag="pulltest",
            timeout_ms=120_000,
        )

        result = await client.run("resolver", request)

        assert (result["status"], result["data"]) == ("success", "pulled"), result
        assert image_present(reference)
    finally:
        # The veritech goes first (fixture teardown comes after this block),
        # so only the tag is removed here; its containers hold no lock on it.
        with contextlib.suppress(AssertionError):
            await adocker("rmi", "--no-prune", reference)


async def test_image_that_exists_nowhere_is_image_unavailable_quickly(
    start_docker_veritech: StartDockerVeritech, client: Client
) -> None:
    await start_docker_veritech()
    image = f"127.0.0.1:{free_port()}/nope/nope:1"
    request = make_request(
        "function main() { return 1 }",
        container_image=image,
        timeout_ms=60_000,
    )
    started = time.monotonic()

    result = await client.run("resolver", request)

    elapsed = time.monotonic() - started
    assert result["status"] == "failure"
    error = result["error"]
    assert error["kind"] == "image_unavailable"
    assert error["message"].startswith(f"image {image} is unavailable: "), error
    assert "connection refused" in error["message"], error
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert not image_present(image)
