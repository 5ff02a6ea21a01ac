"""Kill and status on the control subjects, through real veritech servers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from conftest import StartVeritech, wait_until
from veritech import __version__
from veritech.backends.process import ProcessInstance
from veritech.client import Client, make_request
from veritech.server.server import Veritech

LOOP = "function main() { console.log('looping'); while (true) {} }"
VERITECH = str(Path(sys.executable).parent / "veritech")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc), to check for orphans."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces; the fields after it do not.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait is missing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def start_looping(
    client: Client, execution_id: str
) -> tuple[asyncio.Task[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Start a looping execution; return once its first output line arrived."""
    seen: list[dict[str, Any]] = []

    async def collect() -> list[dict[str, Any]]:
        request = make_request(LOOP, execution_id=execution_id, timeout_ms=60_000)
        async for message in client.execute("resolver", request):
            seen.append(message)
        return seen

    task = asyncio.create_task(collect())
    await wait_until(
        lambda: any(m["type"] == "output" for m in seen) or task.done(),
        what="the looping execution to print",
    )
    return task, seen


def owner_of(servers: list[Veritech], execution_id: str) -> Veritech:
    owners = [s for s in servers if execution_id in s._running]
    assert len(owners) == 1
    return owners[0]


async def test_kill_ends_the_execution_with_one_killed_result_and_no_process(
    veritech: Veritech, client: Client
) -> None:
    task, _ = await start_looping(client, "kill-me-1")
    execution = veritech._running["kill-me-1"]
    instance = execution.instance
    assert isinstance(instance, ProcessInstance)
    pids = {instance._process.pid} | descendants(instance._process.pid)
    assert len(pids) >= 3  # bwrap or cyclone, and the deno runner below it

    killed = await client.kill("kill-me-1")

    assert killed is True
    messages = await asyncio.wait_for(task, 30)
    results = [m for m in messages if m["type"] == "result"]
    assert len(results) == 1 and messages[-1] is results[0]
    assert results[0]["status"] == "failure"
    assert results[0]["error"] == {
        "kind": "killed",
        "message": "the execution was killed on request",
    }
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    await wait_until(
        lambda: not any(alive(p) for p in pids), what="the instance's processes to end"
    )
    await wait_until(lambda: not instance.directory.exists(), what="dir removal")
    await veritech.pool.wait_full(60)
    assert veritech.status()["running"] == 0
    result = await client.run("resolver", make_request("function main() { return 7 }"))
    assert result["data"] == 7


async def test_kill_answer_is_the_documented_object(
    veritech: Veritech, client: Client, nc: NATS, prefix: str
) -> None:
    task, _ = await start_looping(client, "kill-me-raw")

    reply = await nc.request(
        f"{prefix}veritech.control.kill",
        json.dumps({"execution_id": "kill-me-raw"}).encode(),
        timeout=5,
    )

    assert json.loads(reply.data) == {"execution_id": "kill-me-raw", "killed": True}
    messages = await asyncio.wait_for(task, 30)
    assert messages[-1]["error"]["kind"] == "killed"


async def test_kill_of_an_unknown_execution_gets_no_answer(
    veritech: Veritech, client: Client
) -> None:
    assert await client.kill("nobody-runs-this", timeout_s=0.3) is False


async def test_kill_of_a_finished_execution_gets_no_answer(
    veritech: Veritech, client: Client
) -> None:
    request = make_request("function main() { return 1 }", execution_id="done-1")
    assert (await client.run("resolver", request))["status"] == "success"

    assert await client.kill("done-1", timeout_s=0.3) is False


async def test_only_the_owning_instance_answers_a_kill(
    start_veritech: StartVeritech, client: Client, nc: NATS, prefix: str
) -> None:
    servers = [await start_veritech(), await start_veritech()]
    task, _ = await start_looping(client, "kill-me-2")
    owner = owner_of(servers, "kill-me-2")
    answers: list[Msg] = []
    inbox = nc.new_inbox()

    async def collect(msg: Msg) -> None:
        answers.append(msg)

    subscription = await nc.subscribe(inbox, cb=collect)

    await nc.publish(
        f"{prefix}veritech.control.kill",
        json.dumps({"execution_id": "kill-me-2"}).encode(),
        reply=inbox,
    )
    messages = await asyncio.wait_for(task, 30)
    # Both servers have heard the kill once a status round trip to each is
    # done: NATS keeps one publisher's messages in order.
    await client.status(window_s=0.3)
    await subscription.unsubscribe()

    assert [json.loads(a.data) for a in answers] == [
        {"execution_id": "kill-me-2", "killed": True}
    ]
    assert messages[-1]["error"]["kind"] == "killed"
    assert messages[0]["instance"] == owner.id


async def test_status_gathers_every_instance(
    start_veritech: StartVeritech, client: Client
) -> None:
    servers = [await start_veritech(pool_size=2), await start_veritech(pool_size=1)]
    task, _ = await start_looping(client, "busy-1")
    owner = owner_of(servers, "busy-1")
    for server in servers:
        await server.pool.wait_full(60)

    answers = await client.status()

    assert sorted(a["instance"] for a in answers) == sorted(s.id for s in servers)
    by_id = {a["instance"]: a for a in answers}
    for server in servers:
        answer = by_id[server.id]
        assert answer["backend"] == "process"
        assert answer["version"] == __version__
        assert answer["running"] == (1 if server is owner else 0)
        size = server.config.pool_size
        assert answer["pool"]["local"]["ready"] == size
        assert answer["pool"]["local"]["size"] == size
    assert await client.kill("busy-1")
    await asyncio.wait_for(task, 30)


async def run_cli(*args: str) -> tuple[int, str, str]:
    # The servers run in this event loop: the CLI must not block it.
    process = await asyncio.create_subprocess_exec(
        VERITECH,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_status_cli_prints_a_table_of_every_instance(
    start_veritech: StartVeritech, nats_url: str, prefix: str
) -> None:
    servers = [await start_veritech(), await start_veritech()]

    code, stdout, stderr = await run_cli(
        "status", "--nats-url", nats_url, "--subject-prefix", prefix
    )

    assert code == 0, stderr
    header = next(line for line in stdout.splitlines() if "instance" in line)
    for column in ("backend", "running", "pool ready/size", "version"):
        assert column in header
    for server in servers:
        row = next(line for line in stdout.splitlines() if server.id in line)
        assert "process" in row and "local 2/2" in row and __version__ in row


async def test_status_cli_fails_when_no_instance_answers(
    nats_url: str, prefix: str
) -> None:
    code, _, stderr = await run_cli(
        "status", "--nats-url", nats_url, "--subject-prefix", prefix
    )

    assert code == 1
    assert "no veritech instance answered" in stderr


async def test_kill_cli_exit_codes(
    veritech: Veritech, client: Client, nats_url: str, prefix: str
) -> None:
    task, _ = await start_looping(client, "kill-me-cli")
    common = ("--nats-url", nats_url, "--subject-prefix", prefix)

    code, stdout, stderr = await run_cli("kill", "kill-me-cli", *common)

    assert (code, stdout.strip()) == (0, "killed kill-me-cli"), stderr
    messages = await asyncio.wait_for(task, 30)
    assert messages[-1]["error"]["kind"] == "killed"

    code, stdout, stderr = await run_cli(
        "kill", "kill-me-cli", *common, "--timeout", "0.3"
    )

    assert code == 1
    assert "no instance is running execution kill-me-cli" in stderr
