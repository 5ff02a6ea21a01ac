"""What a function in a container cannot do, and what its limits turn into.

Each check is made twice where it can be: once as user code (Deno's missing
permissions stop it first) and once underneath Deno, with ``docker exec`` in a
ready container, so the container itself is shown to hold too.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from veritech.backends.docker import MANAGED_LABEL, OWNER_LABEL
from veritech.client import Client, make_request

from .conftest import StartDockerVeritech, adocker, inspect, ready_container

pytestmark = pytest.mark.docker

PYTHON = "/opt/cyclone/bin/python"


def assert_not_capable(result: dict[str, object], needs: str) -> None:
    assert result["status"] == "failure", result
    error = result["error"]
    assert isinstance(error, dict)
    assert (error["kind"], error["name"]) == ("user_code_exception", "NotCapable")
    assert error["message"].startswith(f"Requires {needs} access"), error


async def test_container_runs_with_every_sandbox_flag(
    start_docker_veritech: StartDockerVeritech,
) -> None:
    server = await start_docker_veritech(
        docker={"memory_mb": 300, "cpus": 0.5, "pids_limit": 64, "tmp_size_mb": 16}
    )

    info = inspect(await ready_container(server))

    host = info["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["PidsLimit"] == 64
    assert host["Memory"] == host["MemorySwap"] == 300 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert host["Init"] is True
    assert host["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=16m"}
    assert len(host["Binds"]) == 1 and host["Binds"][0].endswith(":/run/cyclone:rw")
    assert info["Config"]["User"] == "10001:10001"
    labels = info["Config"]["Labels"]
    assert labels[MANAGED_LABEL] == "true"
    assert labels[OWNER_LABEL] == server.id
    assert info["Config"]["NetworkDisabled"] is True
    assert info["NetworkSettings"]["Networks"] == {}
    # V8's heap limit sits under the container's memory (300 * 3/4 - 64).
    assert info["Config"]["Cmd"][-2:] == ["--memory-mb", "161"]


async def test_function_cannot_reach_the_network(
    start_docker_veritech: StartDockerVeritech, client: Client, nats_url: str
) -> None:
    server = await start_docker_veritech()
    port = nats_url.rsplit(":", 1)[1]
    code = f"async function main() {{ await fetch('http://127.0.0.1:{port}/') }}"

    result = await client.run("resolver", make_request(code))

    assert_not_capable(result, "net")
    # Underneath Deno: the container's 127.0.0.1 is its own, with nothing on it,
    # and it has no interface but loopback.
    probe = (
        "import os, socket\n"
        "print(sorted(os.listdir('/sys/class/net')))\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    out = await adocker("exec", await ready_container(server), PYTHON, "-c", probe)
    assert out.splitlines() == ["['lo']", "ConnectionRefusedError"]


async def test_function_cannot_write_to_the_root_file_system(
    start_docker_veritech: StartDockerVeritech, client: Client
) -> None:
    server = await start_docker_veritech()
    code = "function main() { Deno.writeTextFileSync('/owned', 'x') }"

    result = await client.run("resolver", make_request(code))

    assert_not_capable(result, "write")
    out = await adocker(
        "exec", await ready_container(server), "sh", "-c", "touch /owned 2>&1; true"
    )
    assert out == "touch: cannot touch '/owned': Read-only file system"


async def test_function_cannot_read_host_files(
    start_docker_veritech: StartDockerVeritech, client: Client, tmp_path: Path
) -> None:
    server = await start_docker_veritech()
    canary = tmp_path / "host-secret.txt"
    canary.write_text("host secret")
    code = f"function main() {{ return Deno.readTextFileSync('{canary}') }}"

    result = await client.run("resolver", make_request(code))

    assert_not_capable(result, "read")
    out = await adocker(
        "exec", await ready_container(server), "sh", "-c", f"cat {canary} 2>&1; true"
    )
    assert out == f"cat: {canary}: No such file or directory"


async def test_function_cannot_see_the_environment_of_veritech(
    start_docker_veritech: StartDockerVeritech,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = secrets.token_hex(8)
    monkeypatch.setenv("VERITECH_TEST_CANARY", secret)
    server = await start_docker_veritech()

    read_one = "function main() { return Deno.env.get('VERITECH_TEST_CANARY') }"
    read_all = "function main() { return Deno.env.toObject() }"
    for code in (read_one, read_all):
        assert_not_capable(await client.run("resolver", make_request(code)), "env")

    container = await ready_container(server)
    assert not any(secret in e for e in inspect(container)["Config"]["Env"] or [])
    out = await adocker("exec", container, "sh", "-c", "cat /proc/*/environ; true")
    assert secret not in out


async def test_v8_heap_hog_is_out_of_memory(
    start_docker_veritech: StartDockerVeritech, client: Client
) -> None:
    await start_docker_veritech(docker={"memory_mb": 256})
    code = (
        "function main() { const a = []; "
        "while (true) { a.push(new Array(100000).fill({x: 1})) } }"
    )

    result = await client.run("resolver", make_request(code, timeout_ms=60_000))

    assert result["status"] == "failure"
    assert result["error"] == {
        "kind": "out_of_memory",
        "message": "the function ran out of memory (limit 128 MiB of heap)",
    }


async def test_memory_outside_the_heap_meets_the_container_limit(
    start_docker_veritech: StartDockerVeritech, client: Client
) -> None:
    # ArrayBuffers live outside V8's heap, so its limit does not stop them;
    # the container's cgroup does, and veritech learns of it from the engine.
    await start_docker_veritech(docker={"memory_mb": 256})
    code = (
        "function main() { const a = []; while (true) {"
        " const b = new Uint8Array(16 * 1024 * 1024); b.fill(1); a.push(b) } }"
    )

    result = await client.run("resolver", make_request(code, timeout_ms=60_000))

    assert result["status"] == "failure"
    error = result["error"]
    assert error["kind"] == "out_of_memory"
    assert error["message"].endswith(
        "the container exceeded its memory limit of 256 MiB and was killed by "
        "the kernel"
    ), error


async def test_function_cannot_start_processes(
    start_docker_veritech: StartDockerVeritech, client: Client
) -> None:
    await start_docker_veritech()
    code = (
        "function main() { new Deno.Command('/bin/sh', "
        "{args: ['-c', ':(){ :|:& };:']}).spawn() }"
    )

    result = await client.run("resolver", make_request(code))

    assert_not_capable(result, "run")


async def test_fork_bomb_under_deno_is_stopped_by_the_pids_limit(
    start_docker_veritech: StartDockerVeritech,
) -> None:
    # Were Deno's permission check ever bypassed, the cgroup's pids limit
    # still holds: a fork loop in the container gets EAGAIN well before it.
    server = await start_docker_veritech(docker={"pids_limit": 64})
    bomb = (
        "import os, time\n"
        "children = []\n"
        "try:\n"
        "    while True:\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        children.append(pid)\n"
        "except OSError as e:\n"
        "    print(len(children), e.errno)\n"
        "for pid in children:\n"
        "    os.kill(pid, 9)\n"
    )
    started = time.monotonic()

    out = await adocker("exec", await ready_container(server), PYTHON, "-c", bomb)

    forked, errno = (int(word) for word in out.split())
    assert errno == 11  # EAGAIN
    assert 0 < forked < 64
    # The host stayed responsive: the whole exchange took seconds, not minutes.
    assert time.monotonic() - started < 60
