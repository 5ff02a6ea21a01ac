"""Functions run in containers exactly as they run in local processes."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from conftest import StartVeritech
from veritech.client import Client, make_request

from .conftest import StartDockerVeritech

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def example_commands() -> list[dict[str, Any]]:
    """Every `veritech run examples/...` line of examples/README.md, parsed.

    An example not named there still runs once, with null args.
    """
    readme = EXAMPLES / "README.md"
    text = readme.read_text() if readme.exists() else ""
    commands: list[dict[str, Any]] = []
    for line in text.splitlines():
        words = shlex.split(line.strip()) if "veritech run examples/" in line else []
        if words[:2] != ["veritech", "run"]:
            continue
        command: dict[str, Any] = {"file": words[2], "kind": "resolver", "args": None}
        for flag, value in zip(words[3::2], words[4::2], strict=False):
            if flag == "--kind":
                command["kind"] = value
            elif flag == "--response-type":
                command["response_type"] = value
            elif flag == "--args":
                raw = (ROOT / value[1:]).read_text() if value[0] == "@" else value
                command["args"] = json.loads(raw)
        commands.append(command)
    named = {Path(c["file"]).name for c in commands}
    for path in sorted(EXAMPLES.glob("*.[jt]s")):
        if path.name not in named:
            commands.append({"file": f"examples/{path.name}", "kind": "resolver"})
    return commands


async def run(client: Client, command: dict[str, Any]) -> dict[str, Any]:
    path = ROOT / command["file"]
    request = make_request(
        path.read_text(),
        args=command.get("args"),
        language="typescript" if path.suffix == ".ts" else "javascript",
        response_type=command.get("response_type"),
        timeout_ms=30_000,
    )
    messages = [m async for m in client.execute(command["kind"], request)]
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    result = messages[-1]
    return {
        "output": [
            (m["stream"], m["level"], m["message"])
            for m in messages
            if m["type"] == "output"
        ],
        "status": result["status"],
        "data": result.get("data"),
        "unset": result.get("unset"),
        "error": result.get("error"),
    }


async def test_every_example_gives_the_same_answer_in_docker_as_in_a_process(
    start_veritech: StartVeritech,
    start_docker_veritech: StartDockerVeritech,
    nc: NATS,
    prefix: str,
) -> None:
    commands = example_commands()
    assert any(c["file"] == "examples/image_reference.js" for c in commands)
    await start_veritech(pool_size=2)
    await start_docker_veritech(subject_prefix=f"{prefix}docker.", pool_size=2)
    local = Client(nc, subject_prefix=prefix, heartbeat_interval_s=1.0)
    docker = Client(nc, subject_prefix=f"{prefix}docker.", heartbeat_interval_s=1.0)

    for command in commands:
        expected = await run(local, command)
        got = await run(docker, command)

        assert got == expected, command["file"]


async def test_image_reference_example_runs_in_docker(
    start_docker_veritech: StartDockerVeritech, client: Client
) -> None:
    await start_docker_veritech()
    command = {
        "file": "examples/image_reference.js",
        "kind": "resolver",
        "args": {"registry": "ghcr.io", "repository": "acme/api", "tag": "1.4.2"},
    }

    answer = await run(client, command)

    assert answer == {
        "output": [("stdout", "info", "image reference: ghcr.io/acme/api:1.4.2")],
        "status": "success",
        "data": "ghcr.io/acme/api:1.4.2",
        "unset": False,
        "error": None,
    }


KINDS = [
    (
        "resolver",
        "function main(a) { console.log('n', a.n); return a.n * 2 }",
        {"n": 21},
        {"response_type": "integer"},
        42,
    ),
    (
        "qualification",
        "function main(c) { return c.ok ? {result: 'success'}"
        " : {result: 'failure', message: 'not ok'} }",
        {"ok": False},
        {},
        {"result": "failure", "message": "not ok"},
    ),
    (
        "action",
        "async function main(c) { throw new Error('cannot restart ' + c.name) }",
        {"name": "db"},
        {},
        {"status": "error", "message": "cannot restart db"},
    ),
    (
        "validation",
        "function main(v: string): {valid: boolean, message?: string} {"
        " return v.length > 3 ? {valid: true} : {valid: false, message: 'short'} }",
        "ab",
        {"language": "typescript"},
        {"valid": False, "message": "short"},
    ),
]


@pytest.mark.parametrize(("kind", "code", "args", "fields", "data"), KINDS)
async def test_each_kind_runs_in_docker(
    start_docker_veritech: StartDockerVeritech,
    client: Client,
    kind: str,
    code: str,
    args: Any,
    fields: dict[str, Any],
    data: Any,
) -> None:
    server = await start_docker_veritech()

    messages = [
        m async for m in client.execute(kind, make_request(code, args=args, **fields))
    ]

    assert messages[0]["instance"] == server.id
    result = messages[-1]
    assert (result["status"], result["data"]) == ("success", data), result
