"""The process backend: each instance is a local cyclone process.

Each instance gets a private directory holding its Unix socket. Where bubblewrap
is installed the process runs inside it (see veritech.backends.sandbox);
elsewhere it runs unwrapped and veritech says so once, at startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from veritech._process import die_with_parent
from veritech.backends.base import Backend, Instance
from veritech.backends.sandbox import bwrap_argv, python_roots
from veritech.cyclone.runner import default_deno
from veritech.wire import ErrorKind

logger = logging.getLogger("veritech.backend.process")

OWNER_FILE = "owner.pid"
PID_FILE = "cyclone.pid"


@dataclass(frozen=True, slots=True)
class ProcessLimits:
    memory_mb: int = 256
    tmp_bytes: int = 16 * 1024 * 1024
    watch_timeout_s: float = 10.0
    heartbeat_interval_s: float = 5.0


def default_runtime_root() -> Path:
    return Path(tempfile.gettempdir()) / "veritech-process"


class ProcessInstance(Instance):
    def __init__(
        self,
        instance_id: str,
        directory: Path,
        process: asyncio.subprocess.Process,
        on_close: Callable[[ProcessInstance], None] | None = None,
    ) -> None:
        super().__init__(instance_id, "local", directory / "cyclone.sock")
        self.directory = directory
        self._process = process
        self._stderr = directory / "stderr.log"
        self._on_close = on_close

    @property
    def alive(self) -> bool:
        return self._process.returncode is None

    @property
    def pid(self) -> int:
        """PID of the instance's process (bubblewrap where it sandboxes cyclone)."""
        return self._process.pid

    async def describe_failure(self) -> str:
        with contextlib.suppress(OSError):
            text = self._stderr.read_text(errors="replace").strip()
            if text:
                return text[-800:]
        return f"exit code {self._process.returncode}"

    async def exit_reason(self) -> tuple[ErrorKind, str] | None:
        if self.alive:
            return None
        code = self._process.returncode
        return ErrorKind.INTERNAL, f"the instance process exited (code {code})"

    async def kill(self) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await self._process.wait()

    async def aclose(self) -> None:
        # The backend forgets it first: the server closes spent instances
        # itself, and a backend that kept them would grow with every execution.
        if self._on_close is not None:
            self._on_close(self)
        await self.connection.aclose()
        await self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


class ProcessBackend(Backend):
    name = "process"

    def __init__(
        self,
        owner_id: str,
        limits: ProcessLimits | None = None,
        *,
        runtime_root: Path | None = None,
        sandbox: bool = True,
    ) -> None:
        self._owner_id = owner_id
        self._limits = limits or ProcessLimits()
        self._root = runtime_root or default_runtime_root()
        self._bwrap = shutil.which("bwrap") if sandbox else None
        self._want_sandbox = sandbox
        self._deno = default_deno()
        self._counter = itertools.count()
        self._instances: set[ProcessInstance] = set()

    def image_for(self, image: str | None, tag: str | None) -> str:
        # Local processes have no images: every request shares the one pool,
        # whatever container_image it names.
        return self.default_image()

    @property
    def sandboxed(self) -> bool:
        return self._bwrap is not None

    async def start(self) -> None:
        # 1. The runtime root is shared by every veritech on this host.
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)

        # 2. Sweep what a crashed veritech left behind.
        sweep_runtime_root(self._root)

        # 3. Say once, loudly, when instances will not be sandboxed.
        if self._bwrap is None:
            why = (
                "disabled by configuration"
                if not self._want_sandbox
                else ("bwrap (bubblewrap) is not installed")
            )
            logger.warning(
                "process backend runs cyclone WITHOUT a sandbox (%s): user code is "
                "limited only by Deno's permissions",
                why,
            )
        else:
            logger.info("process backend sandboxes cyclone with %s", self._bwrap)

    async def start_instance(self, image: str) -> Instance:
        # 1. A private directory for the socket, named after its owner.
        instance_id = f"{self._owner_id}-{next(self._counter)}"
        directory = self._root / instance_id
        directory.mkdir(mode=0o700)
        (directory / OWNER_FILE).write_text(str(os.getpid()))

        # 2. Start cyclone, in the sandbox where there is one.
        socket_path = directory / "cyclone.sock"
        command = [
            sys.executable,
            "-m",
            "veritech.cyclone",
            "serve",
            "--bind-uds",
            str(socket_path),
            *(["--oneshot"] if self.single_use else []),
            "--watch-timeout",
            str(self._limits.watch_timeout_s),
            "--heartbeat-interval",
            str(self._limits.heartbeat_interval_s),
            "--memory-mb",
            str(self._limits.memory_mb),
            "--deno",
            self._deno,
        ]
        if self._bwrap is not None:
            command = bwrap_argv(
                self._bwrap,
                command,
                instance_dir=directory,
                read_only=[*python_roots(), str(Path(self._deno).parent)],
                tmp_size_bytes=self._limits.tmp_bytes,
            )
        with (directory / "stderr.log").open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                # bwrap's --die-with-parent guards what runs inside it; this
                # makes bwrap itself (or an unwrapped cyclone) die with us.
                preexec_fn=die_with_parent,
            )
        (directory / PID_FILE).write_text(str(process.pid))
        instance = ProcessInstance(
            instance_id, directory, process, on_close=self._instances.discard
        )
        self._instances.add(instance)

        # 3. Hand it over only once its runner is loaded and waiting.
        try:
            await instance.wait_ready()
        except BaseException:
            await self.discard(instance)
            raise
        return instance

    async def discard(self, instance: ProcessInstance) -> None:
        self._instances.discard(instance)
        await instance.aclose()

    async def aclose(self) -> None:
        instances, self._instances = list(self._instances), set()
        await asyncio.gather(*(i.aclose() for i in instances), return_exceptions=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def sweep_runtime_root(root: Path) -> int:
    """Remove instance directories whose veritech is gone; kill their cyclone.

    A cyclone is killed only if its command line still names its own socket
    path, so a recycled PID never takes an unrelated process down.
    """
    removed = 0
    for directory in root.iterdir() if root.exists() else ():
        # Ours, or a live veritech's: not left by a crash.
        owner = _read_pid(directory / OWNER_FILE)
        if owner is not None and (owner == os.getpid() or _pid_alive(owner)):
            continue
        pid = _read_pid(directory / PID_FILE)
        if pid is not None and _cmdline_mentions(pid, str(directory)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)
        removed += 1
    if removed:
        logger.info("swept %d instance directories left by a crash", removed)
    return removed


def _cmdline_mentions(pid: int, text: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return text.encode() in cmdline
