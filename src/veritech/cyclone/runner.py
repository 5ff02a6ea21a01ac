"""Supervision of one language runner process (the Deno side of cyclone).

A runner is started ahead of demand and waits, fully loaded, for its single
request; after that request it exits. ``Runner`` is the thin adapter around the
process; what its lines mean is decided in ``veritech.cyclone.protocol``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import secrets
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from veritech._process import die_with_parent
from veritech.cyclone.protocol import (
    Output,
    Returned,
    Threw,
    looks_out_of_memory,
    split_runner_line,
    stderr_output,
)
from veritech.wire import ErrorKind

logger = logging.getLogger("cyclone.runner")

# A runner line holds at most one result or one output message; anything longer
# than this cannot be carried by NATS anyway (its max_payload is far smaller).
MAX_LINE_BYTES = 16 * 1024 * 1024
READY_TIMEOUT_S = 30.0


# V8 reserves its code range (512 MiB) as writable private memory at startup,
# which RLIMIT_DATA counts although it is never touched: measured, Deno 2.9
# needs about 540 MiB of RLIMIT_DATA to start at all. This reserve covers that
# and Deno's own allocations (the TypeScript compiler, buffers).
RUNTIME_DATA_RESERVE_MB = 640


def data_limit_bytes(memory_mb: int) -> int:
    """The runner's RLIMIT_DATA: the V8 heap, as much again outside it
    (ArrayBuffers, WebAssembly memory), and the runtime's reserve."""
    return (2 * memory_mb + RUNTIME_DATA_RESERVE_MB) * 1024 * 1024


def _prepare_child(data_limit: int) -> None:
    """In the child before exec: be killed when cyclone dies, however it dies,
    and bound the memory it can commit, the V8 heap's limit aside.

    RLIMIT_AS cannot be used: V8 reserves many GiB of address space up front
    (pointer cage, code range) and Deno does not start under any useful one.
    """
    die_with_parent()
    resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))


def runner_script() -> Path:
    """Path of the lang-js runner shipped inside the package."""
    return Path(str(resources.files("veritech.runners").joinpath("lang_js.ts")))


def default_deno() -> str:
    from deno import find_deno_bin  # type: ignore[import-untyped]

    return str(find_deno_bin())


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    deno: str
    work_dir: Path
    memory_mb: int = 256
    script: Path | None = None


@dataclass(frozen=True, slots=True)
class Crashed:
    """The runner ended without a result; ``kind`` says what is known of why."""

    kind: ErrorKind
    message: str


Ending = Returned | Threw | Crashed
Emit = Callable[[Output], Awaitable[None]]


class RunnerState(Enum):
    STARTING = "starting"
    READY = "ready"
    RUNNING = "running"
    DONE = "done"


class RunnerStartError(Exception):
    pass


class Runner:
    def __init__(self, process: asyncio.subprocess.Process, memory_mb: int) -> None:
        self._process = process
        self._memory_mb = memory_mb
        self.state = RunnerState.STARTING

    @classmethod
    async def start(cls, config: RunnerConfig) -> Runner:
        """Spawn the runner and wait until it says it is ready."""
        deno_dir = config.work_dir / "deno"
        deno_dir.mkdir(parents=True, exist_ok=True)
        script = config.script or runner_script()
        # No --allow-* flag at all: the code gets no net, files, env, run or ffi.
        # The environment is rebuilt from nothing so no host variable leaks in.
        argv = [
            config.deno,
            "run",
            "--quiet",
            "--no-prompt",
            "--no-config",
            "--no-lock",
            "--no-remote",
            "--no-npm",
            f"--v8-flags=--max-old-space-size={config.memory_mb}",
            str(script),
        ]
        env = {
            "DENO_DIR": str(deno_dir),
            "NO_COLOR": "1",
            "DENO_NO_UPDATE_CHECK": "1",
            "HOME": str(config.work_dir),
            "PATH": "/usr/bin:/bin",
        }
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=str(config.work_dir),
            limit=MAX_LINE_BYTES,
            start_new_session=True,
            preexec_fn=partial(_prepare_child, data_limit_bytes(config.memory_mb)),
        )
        runner = cls(process, config.memory_mb)
        await runner._wait_ready()
        return runner

    async def _wait_ready(self) -> None:
        assert self._process.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                line = await self._process.stdout.readline()
        except TimeoutError:
            await self.kill()
            raise RunnerStartError("runner did not become ready in time") from None
        if line.strip() != b'{"type":"ready"}':
            stderr = await self._drain_stderr()
            await self.kill()
            raise RunnerStartError(f"runner failed to start: {stderr.strip()[-500:]}")
        self.state = RunnerState.READY
        logger.debug("runner %d ready", self._process.pid)

    async def _drain_stderr(self) -> str:
        assert self._process.stderr is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                return (await self._process.stderr.read()).decode(errors="replace")
        return ""

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.returncode is None

    async def execute(
        self, request: dict[str, Any], timeout_s: float, emit: Emit
    ) -> Ending:
        """Run the one request; output goes to ``emit``; returns how it ended."""
        if self.state is not RunnerState.READY:
            raise RuntimeError(f"runner is {self.state.value}, not ready")
        self.state = RunnerState.RUNNING
        nonce = secrets.token_hex(16)
        try:
            return await self._execute(request, nonce, timeout_s, emit)
        finally:
            self.state = RunnerState.DONE
            await self.kill()

    async def _execute(
        self, request: dict[str, Any], nonce: str, timeout_s: float, emit: Emit
    ) -> Ending:
        # 1. Hand over the request; closing stdin means user code reads nothing.
        assert self._process.stdin is not None
        line = json.dumps({**request, "nonce": nonce}, ensure_ascii=False) + "\n"
        try:
            self._process.stdin.write(line.encode())
            await self._process.stdin.drain()
            self._process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            return await self._crashed()

        # 2. Relay stdout and stderr until a result, an exit or the deadline.
        stderr_tail: list[str] = []
        stderr_task = asyncio.create_task(self._pump_stderr(emit, stderr_tail))
        try:
            async with asyncio.timeout(timeout_s):
                ending = await self._pump_stdout(nonce, emit)
        except TimeoutError:
            await self.kill()
            return Crashed(
                ErrorKind.TIMEOUT,
                f"the function did not finish within its timeout of "
                f"{round(timeout_s * 1000)} ms",
            )
        except ValueError:
            # StreamReader raises ValueError when a line passes its limit.
            await self.kill()
            return Crashed(
                ErrorKind.RESULT_TOO_LARGE,
                f"the function produced a message larger than {MAX_LINE_BYTES} bytes",
            )
        finally:
            await _settle(stderr_task)

        # 3. The runner ended without a result line: say what is known of why.
        if ending is None:
            return await self._crashed("\n".join(stderr_tail))
        if _is_allocation_failure(ending):
            return Crashed(
                ErrorKind.OUT_OF_MEMORY,
                "the function ran out of memory: an ArrayBuffer allocation failed "
                f"(limit {self._memory_mb} MiB outside the heap)",
            )
        return ending

    async def _pump_stdout(self, nonce: str, emit: Emit) -> Returned | Threw | None:
        assert self._process.stdout is not None
        while True:
            raw = await self._process.stdout.readline()
            if not raw:
                return None
            line = raw.rstrip(b"\n").decode("utf-8", errors="replace")
            for event in split_runner_line(line, nonce):
                if not isinstance(event, Output):
                    return event
                await emit(event)

    async def _pump_stderr(self, emit: Emit, tail: list[str]) -> None:
        assert self._process.stderr is not None
        relaying = True
        while True:
            try:
                raw = await self._process.stderr.readline()
            except ValueError:
                continue
            if not raw:
                return
            text = raw.rstrip(b"\n").decode("utf-8", errors="replace")
            tail.append(text)
            del tail[:-20]
            # A fatal V8 error is followed by a C stack trace: the first line
            # is worth showing, the dump is not.
            if text.startswith("# Fatal"):
                relaying = False
            if relaying and text.strip():
                await emit(stderr_output(text))

    async def _crashed(self, stderr_tail: str = "") -> Crashed:
        code = await self._process.wait()
        if looks_out_of_memory(stderr_tail):
            return Crashed(
                ErrorKind.OUT_OF_MEMORY,
                f"the function ran out of memory (limit {self._memory_mb} MiB of heap)",
            )
        if code < 0 and -code == signal.SIGKILL:
            return Crashed(ErrorKind.INTERNAL, "the runner process was killed")
        return Crashed(
            ErrorKind.USER_CODE_EXCEPTION,
            f"the runner exited with code {code} before returning a result "
            "(the function may have called Deno.exit)",
        )

    async def kill(self) -> None:
        """Kill the runner's process group and reap it; idempotent."""
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await self._process.wait()


def _is_allocation_failure(ending: Ending) -> bool:
    # What V8 throws when memory outside its heap (an ArrayBuffer's backing
    # store) cannot be had: here, because the runner's RLIMIT_DATA is reached.
    return (
        isinstance(ending, Threw)
        and ending.name == "RangeError"
        and ending.message == "Array buffer allocation failed"
    )


async def _settle(task: asyncio.Task[None]) -> None:
    """Let a pump deliver its last lines (an OOM note), then stop it."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), 0.5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
