"""Secrets sealed for veritech: opened, handed to the function, redacted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import StartVeritech, wait_until
from veritech.backends.process import ProcessInstance
from veritech.client import Client, make_request, open_client
from veritech.secrets import REDACTED, Keyring, PublicKeyInfo, seal
from veritech.server.server import Veritech

BIN = Path(sys.executable).parent
# Quotes, a backslash and a non-ASCII letter: the secret must be found in its
# JSON-escaped forms too, as when user code logs an object holding it.
SECRET = 's3cr3t-"quoted"-\\-é-9f8e7d'
LEAKY = """
async function main(args, secrets) {
  const s = secrets.TOKEN;
  console.log(s);
  console.log({ s });
  console.error("token=" + s + ";");
  console.warn(JSON.stringify([s, s]));
  if (args.throw) throw new Error(JSON.stringify({ leaked: s }));
  return { value: s, nested: ["prefix-" + s, { deep: s }], length: s.length };
}
"""


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture
async def keyed(start_veritech: StartVeritech, keyring: Keyring) -> Veritech:
    return await start_veritech(keyring=keyring)


def sealed_request(
    code: str, public: PublicKeyInfo, args: Any = None, **fields: Any
) -> dict[str, Any]:
    return make_request(
        code, args=args or {}, secrets={"TOKEN": seal(SECRET, public)}, **fields
    )


def wire_text(messages: list[dict[str, Any]]) -> str:
    return json.dumps(messages, ensure_ascii=False) + json.dumps(messages)


async def test_the_function_gets_the_secret_and_every_occurrence_is_redacted(
    keyed: Veritech,
    keyring: Keyring,
    client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    request = sealed_request(LEAKY, keyring.public)

    messages = [m async for m in client.execute("resolver", request)]

    lines = [m["message"] for m in messages if m["type"] == "output"]
    assert lines == [
        REDACTED,
        '{"s":"[redacted]"}',
        "token=[redacted];",
        '["[redacted]","[redacted]"]',
    ]
    result = messages[-1]
    assert result["status"] == "success"
    # The function really had the plaintext: its length is not redacted.
    assert result["data"] == {
        "value": REDACTED,
        "nested": [f"prefix-{REDACTED}", {"deep": REDACTED}],
        "length": len(SECRET),
    }
    assert SECRET not in wire_text(messages)
    assert "s3cr3t" not in wire_text(messages)
    assert "s3cr3t" not in caplog.text


async def test_a_secret_in_an_error_message_is_redacted(
    keyed: Veritech,
    keyring: Keyring,
    client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    request = sealed_request(LEAKY, keyring.public, args={"throw": True})

    messages = [m async for m in client.execute("resolver", request)]

    assert messages[-1]["error"] == {
        "kind": "user_code_exception",
        "name": "Error",
        "message": '{"leaked":"[redacted]"}',
    }
    assert "s3cr3t" not in wire_text(messages)
    assert "s3cr3t" not in caplog.text


async def test_an_action_that_throws_with_the_secret_is_redacted(
    keyed: Veritech, keyring: Keyring, client: Client
) -> None:
    request = sealed_request(LEAKY, keyring.public, args={"throw": True})

    result = await client.run("action", request)

    assert result["status"] == "success"
    assert result["data"] == {"status": "error", "message": '{"leaked":"[redacted]"}'}


async def test_each_line_of_a_multi_line_secret_is_redacted(
    keyed: Veritech, keyring: Keyring, client: Client
) -> None:
    pem = "-----BEGIN KEY-----\nAAAAB3NzaC1yc2E\nEAAAADAQABAAAB\n-----END KEY-----"
    code = "function main(_, s) { console.log(s.PEM); return s.PEM.split('\\n') }"
    request = make_request(code, args={}, secrets={"PEM": seal(pem, keyring.public)})

    messages = [m async for m in client.execute("resolver", request)]

    lines = [m["message"] for m in messages if m["type"] == "output"]
    assert lines == [REDACTED] * 4
    assert messages[-1]["data"] == [REDACTED] * 4
    assert "AAAAB3NzaC1yc2E" not in wire_text(messages)


async def test_a_secret_sealed_for_another_key_is_invalid_request(
    keyed: Veritech, keyring: Keyring, client: Client
) -> None:
    other = Keyring.generate()
    request = sealed_request(LEAKY, other.public)

    messages = [m async for m in client.execute("resolver", request)]

    assert [m["type"] for m in messages] == ["accepted", "result"]
    assert messages[-1]["error"] == {
        "kind": "invalid_request",
        "message": f"secret 'TOKEN' is sealed for key {other.public.key_id}, "
        f"but this veritech holds key {keyring.public.key_id}",
    }
    await keyed.pool.wait_full(60)
    assert keyed.status()["running"] == 0


async def test_a_tampered_secret_is_invalid_request(
    keyed: Veritech, keyring: Keyring, client: Client
) -> None:
    sealed = seal(SECRET, keyring.public)
    raw = bytearray(base64.b64decode(sealed["sealed"]))
    raw[-1] ^= 0x01
    sealed["sealed"] = base64.b64encode(bytes(raw)).decode()
    request = make_request(LEAKY, args={}, secrets={"TOKEN": sealed})

    result = await client.run("resolver", request)

    assert result["error"] == {
        "kind": "invalid_request",
        "message": "secret 'TOKEN' could not be opened: it was altered or sealed "
        "for another key",
    }


async def test_a_secret_sealed_for_another_key_under_this_key_id_fails(
    keyed: Veritech, keyring: Keyring, client: Client
) -> None:
    forged = seal(SECRET, Keyring.generate().public)
    forged["key_id"] = keyring.public.key_id
    request = make_request(LEAKY, args={}, secrets={"TOKEN": forged})

    result = await client.run("resolver", request)

    assert result["error"]["kind"] == "invalid_request"
    assert result["error"]["message"] == (
        "secret 'TOKEN' could not be opened: it was altered or sealed for another key"
    )


async def test_a_secret_that_is_not_base64_is_invalid_request(
    keyed: Veritech, keyring: Keyring, client: Client
) -> None:
    bad = {"sealed": "not base64 at all!", "key_id": keyring.public.key_id}
    request = make_request(LEAKY, args={}, secrets={"TOKEN": bad})

    result = await client.run("resolver", request)

    assert result["error"] == {
        "kind": "invalid_request",
        "message": "secret 'TOKEN' is not valid base64",
    }


async def test_secrets_without_a_key_configured_are_invalid_request(
    veritech: Veritech, client: Client
) -> None:
    request = sealed_request(LEAKY, Keyring.generate().public)

    result = await client.run("resolver", request)

    assert result["error"] == {
        "kind": "invalid_request",
        "message": "this veritech has no key configured to open secrets",
    }


def files_containing(root: Path, needle: bytes) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and needle in path.read_bytes():
                found.append(path)
    return found


async def test_the_plaintext_never_touches_the_instance_directory(
    keyed: Veritech,
    keyring: Keyring,
    client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # It prints the secret (to stdout and stderr), then waits with a live
    # timer until it is killed: the scan below runs while it holds the secret.
    code = """async function main(_, secrets) {
        console.log(secrets.TOKEN);
        console.error(secrets.TOKEN);
        await new Promise(() => setInterval(() => {}, 1000));
    }"""
    request = sealed_request(code, keyring.public, execution_id="holds-secret")
    messages: list[dict[str, Any]] = []

    async def collect() -> None:
        async for message in client.execute("resolver", request):
            messages.append(message)

    task = asyncio.create_task(collect())
    await wait_until(
        lambda: sum(m["type"] == "output" for m in messages) >= 2 or task.done(),
        what="the function to print the secret",
    )
    instance = keyed._running["holds-secret"].instance
    assert isinstance(instance, ProcessInstance)
    assert instance.directory.is_dir()
    names = {p.name for p in instance.directory.iterdir()}
    assert {"cyclone.sock", "stderr.log"} <= names

    leaks = files_containing(instance.directory, SECRET.encode())

    assert leaks == []
    assert await client.kill("holds-secret")
    await asyncio.wait_for(task, 30)
    assert messages[-1]["error"]["kind"] == "killed"
    assert "s3cr3t" not in wire_text(messages)
    assert "s3cr3t" not in caplog.text


# -- the command line -------------------------------------------------------------


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "veritech"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})},
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode()


@contextlib.asynccontextmanager
async def serve_process(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "veritech"),
        "serve",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_keygen_then_serve_with_the_key_file_opens_sealed_secrets(
    tmp_path: Path, nats_url: str, prefix: str
) -> None:
    code, text = await run_cli("keygen", "--out-dir", str(tmp_path))

    assert code == 0, text
    private, public_path = tmp_path / "veritech.key", tmp_path / "veritech.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    public = PublicKeyInfo.load(public_path)
    assert f"key id {public.key_id}" in text
    assert "secret_key" not in public_path.read_text()

    async with (
        serve_process(
            "--nats-url",
            nats_url,
            "--subject-prefix",
            prefix,
            "--pool-size",
            "1",
            "--key-file",
            str(private),
        ) as server,
        open_client(nats_url, subject_prefix=prefix) as client,
    ):

        async def answered() -> bool:
            return bool(await client.status(window_s=0.2))

        async with asyncio.timeout(60):
            while not await answered():
                assert server.returncode is None, "veritech serve exited"

        result = await client.run("resolver", sealed_request(LEAKY, public))

    assert result["status"] == "success"
    assert result["data"]["value"] == REDACTED
    assert result["data"]["length"] == len(SECRET)
    assert server.stderr is not None
    logs = (await server.stderr.read()).decode()
    assert "s3cr3t" not in logs
    assert "serving" in logs


async def test_run_cli_seals_a_secret_for_the_embedded_stack(tmp_path: Path) -> None:
    function = tmp_path / "uses_secret.js"
    function.write_text(
        "function main(_, secrets) {\n"
        "  console.log('token', secrets.API_TOKEN);\n"
        "  const token = secrets.API_TOKEN;\n"
        "  return { header: 'Bearer ' + token, n: token.length };\n"
        "}\n"
    )

    code, text = await run_cli(
        "run", "--json", "--secret", "API_TOKEN=tok-12345-abc", str(function)
    )

    assert code == 0, text
    messages = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert [m["message"] for m in messages if m["type"] == "output"] == [
        "token [redacted]"
    ]
    assert messages[-1]["data"] == {"header": "Bearer [redacted]", "n": 13}
    assert "tok-12345-abc" not in text
