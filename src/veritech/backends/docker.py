"""The docker backend: each instance is a fresh, hardened cyclone container.

Every container runs the cyclone image with no network, a read-only root file
system, all capabilities dropped and cgroup limits on memory, CPU and
processes (see ``container_config``). cyclone listens on a Unix socket in a
per-container host directory bind-mounted at /run/cyclone.

Containers carry labels naming the veritech that owns them and the host
process behind it, so a later start (of any veritech on this host) can tell
leftovers of a dead veritech from containers of a live one and remove them.
One events stream per backend tracks container deaths and OOM kills, which
keeps ``DockerInstance.alive`` a cheap attribute read.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError

from veritech import __version__
from veritech.backends.base import Backend, Instance
from veritech.errors import BackendError, ImageUnavailable
from veritech.server.config import DockerSettings
from veritech.wire import ErrorKind

logger = logging.getLogger("veritech.backend.docker")

DEFAULT_IMAGE = "veritech/cyclone"

MANAGED_LABEL = "veritech.managed"
OWNER_LABEL = "veritech.owner"
HOST_LABEL = "veritech.host"
PROCESS_LABEL = "veritech.process"

CONTAINER_USER = "10001:10001"
CONTAINER_SOCKET_DIR = "/run/cyclone"
SOCKET_NAME = "cyclone.sock"
OWNER_FILE = "owner"

# A socket directory without an owner file is either being created right now
# or was left half-made by a crash; only the second is swept.
UNOWNED_GRACE_S = 60.0
# V8's heap limit sits below the container's memory: the Deno binary, V8's
# young generation and cyclone's Python process need room too. With this
# margin a heap hog meets V8's limit (a precise message) before the kernel's.
HEAP_OVERHEAD_MB = 64
EVENTS_RETRY_S = 1.0


def default_image_ref() -> str:
    return f"{DEFAULT_IMAGE}:{__version__}"


def heap_limit_mb(settings: DockerSettings) -> int:
    """The V8 heap limit handed to cyclone for a container of this memory."""
    if settings.heap_mb is not None:
        return settings.heap_mb
    return max(16, settings.memory_mb * 3 // 4 - HEAP_OVERHEAD_MB)


def default_runtime_root() -> Path:
    return Path(tempfile.gettempdir()) / f"veritech-docker-{os.getuid()}"


# -- who owns a container ------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may itself hold spaces or ')'.
    fields = text[text.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def process_key(pid: int | None = None) -> str:
    """``boot:pid:start`` — names one process on one host, reuse-proof."""
    pid = os.getpid() if pid is None else pid
    return f"{_boot_id()}:{pid}:{_start_time(pid)}"


def process_alive(key: str) -> bool:
    """Whether the process a key names still runs (on this host)."""
    boot, _, rest = key.partition(":")
    pid_text, _, start = rest.partition(":")
    if boot != _boot_id() or not pid_text.isdigit():
        return False
    if start == "None":
        # No /proc to read start times from: fall back to "the pid exists".
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _start_time(int(pid_text)) == start


def _hostname() -> str:
    return socket.gethostname()


def _safe_name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", text)[:64] or "veritech"


# -- the container ---------------------------------------------------------------


def container_config(
    image: str,
    settings: DockerSettings,
    labels: dict[str, str],
    socket_dir: Path,
    heartbeat_interval_s: float,
    single_use: bool = True,
) -> dict[str, Any]:
    """The create body (Engine API 1.41) of one sandboxed cyclone container."""
    memory = settings.memory_mb * 1024 * 1024
    command = [
        "--bind-uds",
        f"{CONTAINER_SOCKET_DIR}/{SOCKET_NAME}",
        "--socket-mode",
        "666",
        *(["--oneshot"] if single_use else []),
        "--watch-timeout",
        str(settings.watch_timeout_s),
        "--heartbeat-interval",
        str(heartbeat_interval_s),
        "--memory-mb",
        str(heap_limit_mb(settings)),
    ]
    return {
        "Image": image,
        "Cmd": command,
        "Labels": labels,
        "User": CONTAINER_USER,
        "NetworkDisabled": True,
        "HostConfig": {
            # No interface but loopback: nothing in the container can connect out.
            "NetworkMode": "none",
            # Writes go to the tmpfs only; the image cannot be changed.
            "ReadonlyRootfs": True,
            "Tmpfs": {"/tmp": f"rw,nosuid,nodev,size={settings.tmp_size_mb}m"},
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "PidsLimit": settings.pids_limit,
            # Swap equal to memory: no swap at all, so a hog is killed rather
            # than slowing the host down.
            "Memory": memory,
            "MemorySwap": memory,
            "NanoCpus": round(settings.cpus * 1e9),
            # docker-init as PID 1 forwards signals and reaps what is left.
            "Init": True,
            "Binds": [f"{socket_dir}:{CONTAINER_SOCKET_DIR}:rw"],
            # Not auto-removed: its exit state (OOMKilled) is read afterwards.
            "AutoRemove": False,
            "RestartPolicy": {"Name": "no"},
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "1m"}},
        },
    }


def describe_exit(state: dict[str, Any], memory_mb: int) -> tuple[ErrorKind, str]:
    """What a stopped container's State says about why it ended."""
    code = state.get("ExitCode")
    if state.get("OOMKilled"):
        return ErrorKind.OUT_OF_MEMORY, oom_message(memory_mb)
    if code == 137:
        return (
            ErrorKind.INTERNAL,
            "the container was killed (exit code 137, SIGKILL from outside)",
        )
    return ErrorKind.INTERNAL, f"the container exited with code {code}"


def oom_message(memory_mb: int) -> str:
    return (
        f"the container exceeded its memory limit of {memory_mb} MiB "
        "and was killed by the kernel"
    )


class DockerInstance(Instance):
    def __init__(
        self,
        docker: aiodocker.Docker,
        container_id: str,
        name: str,
        image: str,
        socket_dir: Path,
        memory_mb: int,
        on_close: Callable[[DockerInstance], None],
    ) -> None:
        super().__init__(name, image, socket_dir / SOCKET_NAME)
        self.container_id = container_id
        self.socket_dir = socket_dir
        self._docker = docker
        self._memory_mb = memory_mb
        self._on_close = on_close
        # Kept current by the backend's events stream.
        self._running = True
        self._oom_killed = False
        self._exit_code: int | None = None
        self._closed = False
        self._close_lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self._running and not self._closed

    def on_event(self, action: str, attributes: dict[str, Any]) -> None:
        """A docker event about this container (from the backend's stream)."""
        if action == "oom":
            self._oom_killed = True
        elif action == "die":
            self._running = False
            with contextlib.suppress(KeyError, ValueError, TypeError):
                self._exit_code = int(attributes["exitCode"])

    async def _inspect_state(self) -> dict[str, Any] | None:
        try:
            info = await self._docker.containers.container(self.container_id).show()
        except DockerError:
            return None
        state = info.get("State")
        return state if isinstance(state, dict) else None

    async def exit_reason(self) -> tuple[ErrorKind, str] | None:
        # 1. An OOM kill inside the container (the runner, usually) counts even
        #    while cyclone itself survives to report a lost runner.
        if self._oom_killed:
            return ErrorKind.OUT_OF_MEMORY, oom_message(self._memory_mb)

        # 2. Otherwise ask the engine; the die event may not be here yet.
        state = await self._inspect_state()
        if state is None:
            if self._exit_code is not None:
                return ErrorKind.INTERNAL, (
                    f"the container exited with code {self._exit_code}"
                )
            return None
        if state.get("OOMKilled"):
            self._oom_killed = True
        if state.get("Running") and not self._oom_killed:
            return None
        return describe_exit(state, self._memory_mb)

    async def describe_failure(self) -> str:
        parts: list[str] = []
        state = await self._inspect_state()
        if state is not None and not state.get("Running"):
            parts.append(describe_exit(state, self._memory_mb)[1])
        with contextlib.suppress(DockerError):
            container = self._docker.containers.container(self.container_id)
            lines = await container.log(stdout=True, stderr=True, tail=20)
            text = "".join(lines).strip()
            if text:
                parts.append(f"last output: {text[-800:]}")
        return "; ".join(parts) or "no detail available"

    async def kill(self) -> None:
        self._running = False
        with contextlib.suppress(DockerError):
            await self._docker.containers.container(self.container_id).kill(
                signal="SIGKILL"
            )

    async def aclose(self) -> None:
        async with self._close_lock:
            if self._closed:
                return
            self._closed = True

            # 1. Drop the sockets, then the container (force kills it first).
            await self.connection.aclose()
            await remove_container(self._docker, self.container_id)

            # 2. The socket file outlives a killed container: remove the directory.
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self._on_close(self)


async def remove_container(docker: aiodocker.Docker, container_id: str) -> None:
    """Force-remove a container; one already gone (or going) is fine."""
    try:
        await docker.containers.container(container_id).delete(force=True, v=True)
    except DockerError as exc:
        if exc.status not in (404, 409):
            logger.warning("could not remove container %s: %s", container_id, exc)


# -- the backend ------------------------------------------------------------------


class DockerBackend(Backend):
    name = "docker"

    def __init__(
        self,
        owner_id: str,
        settings: DockerSettings | None = None,
        heartbeat_interval_s: float = 5.0,
        *,
        docker_url: str | None = None,
    ) -> None:
        self._owner = _safe_name(owner_id)
        self._settings = settings or DockerSettings()
        self._heartbeat_interval_s = heartbeat_interval_s
        self._docker_url = docker_url
        runtime = self._settings.runtime_dir
        self._root = Path(runtime) if runtime else default_runtime_root()
        self._owner_dir = self._root / self._owner
        self._process_key = process_key()
        self._host = _hostname()
        self._counter = itertools.count()
        self._docker: aiodocker.Docker | None = None
        self._instances: dict[str, DockerInstance] = {}
        self._events_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def labels(self) -> dict[str, str]:
        return {
            MANAGED_LABEL: "true",
            OWNER_LABEL: self._owner,
            HOST_LABEL: self._host,
            PROCESS_LABEL: self._process_key,
        }

    def default_image(self) -> str:
        return self._settings.default_image or default_image_ref()

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            raise BackendError("the docker backend is not started")
        return self._docker

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        # 1. Reach the engine; the API version is negotiated (the engine's own).
        try:
            self._docker = aiodocker.Docker(url=self._docker_url)
            version = await self._docker.version()
        except (DockerError, AssertionError, ValueError, OSError) as exc:
            if self._docker is not None:
                await self._docker.close()
                self._docker = None
            raise BackendError(f"cannot reach the Docker engine: {exc}") from exc
        logger.info(
            "docker engine %s (API %s)",
            version.get("Version"),
            version.get("ApiVersion"),
        )

        # 2. Follow deaths and OOM kills of our containers before starting any.
        events = await self._open_events()
        self._events_task = asyncio.create_task(self._serve_events(events))

        # 3. Sweep what crashed veritechs on this host left behind.
        self._prepare_root()
        await self.sweep()

        # 4. Our own socket directory, marked with the process that owns it.
        self._owner_dir.mkdir(mode=0o700, exist_ok=True)
        (self._owner_dir / OWNER_FILE).write_text(self._process_key)

    def _prepare_root(self) -> None:
        # The root is private to this uid; refuse one someone else planted.
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = self._root.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise BackendError(
                f"runtime directory {self._root} is not a directory owned by uid "
                f"{os.getuid()}; refusing to use it"
            )
        if info.st_mode & 0o077:
            self._root.chmod(0o700)

    async def sweep(self) -> int:
        """Remove containers and socket directories of dead veritechs here."""
        # 1. Containers: this host's, whose owning process is gone.
        removed = 0
        containers = await self.docker.containers.list(
            all=True, filters={"label": [f"{MANAGED_LABEL}=true"]}
        )
        for container in containers:
            labels = container["Labels"] or {}
            if labels.get(HOST_LABEL) != self._host:
                continue
            if process_alive(labels.get(PROCESS_LABEL, "")):
                continue
            await remove_container(self.docker, container.id)
            removed += 1

        # 2. Socket directories of the same dead owners.
        dirs = 0
        for directory in self._root.iterdir():
            try:
                key = (directory / OWNER_FILE).read_text().strip()
            except OSError:
                key = ""
            if key and process_alive(key):
                continue
            # Another veritech may be sweeping (or creating) it right now.
            with contextlib.suppress(OSError):
                if not key and time.time() - directory.lstat().st_mtime < (
                    UNOWNED_GRACE_S
                ):
                    continue
            shutil.rmtree(directory, ignore_errors=True)
            dirs += 1
        if removed or dirs:
            logger.info(
                "swept %d containers and %d socket directories left by a crash",
                removed,
                dirs,
            )
        return removed

    async def aclose(self) -> None:
        if self._closed or self._docker is None:
            return
        self._closed = True

        # 1. Every instance we handed out or still hold.
        instances = list(self._instances.values())
        await asyncio.gather(*(i.aclose() for i in instances), return_exceptions=True)

        # 2. Anything with our label we lost track of (a start cut short).
        with contextlib.suppress(DockerError):
            for container in await self.docker.containers.list(
                all=True, filters={"label": [f"{OWNER_LABEL}={self._owner}"]}
            ):
                await remove_container(self.docker, container.id)
        shutil.rmtree(self._owner_dir, ignore_errors=True)

        # 3. Then the events stream and the engine connection.
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events_task
        await self._docker.close()

    # -- images ------------------------------------------------------------------

    async def prepare_image(self, image: str) -> None:
        # 1. Present already: nothing to do.
        try:
            await self.docker.images.inspect(image)
            return
        except DockerError as exc:
            if exc.status != 404:
                raise ImageUnavailable(image, exc.message) from exc

        # 2. Pull it, within a deadline; the engine reports failures in-stream.
        logger.info("image %s is not present; pulling it", image)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._settings.pull_timeout_s):
                await self.docker.images.pull(image)
            await self.docker.images.inspect(image)
        except TimeoutError:
            raise ImageUnavailable(
                image,
                f"the pull did not finish within {self._settings.pull_timeout_s:.0f} s",
            ) from None
        except DockerError as exc:
            raise ImageUnavailable(image, exc.message) from exc
        logger.info("pulled %s in %.1f s", image, time.monotonic() - started)

    # -- instances -----------------------------------------------------------------

    async def start_instance(self, image: str) -> Instance:
        # 1. A socket directory uid 10001 can write to, inside our private one.
        name = f"veritech-{self._owner}-{next(self._counter)}"
        socket_dir = self._owner_dir / name
        socket_dir.mkdir(mode=0o700)
        socket_dir.chmod(0o777)

        # 2. Create and start the container.
        config = container_config(
            image,
            self._settings,
            self.labels,
            socket_dir,
            self._heartbeat_interval_s,
            self.single_use,
        )
        try:
            container = await self.docker.containers.create(config, name=name)
        except BaseException as exc:
            shutil.rmtree(socket_dir, ignore_errors=True)
            if isinstance(exc, DockerError):
                if exc.status == 404:
                    raise ImageUnavailable(image, exc.message) from exc
                raise BackendError(f"cannot create a container: {exc.message}") from exc
            raise
        instance = DockerInstance(
            self.docker,
            container.id,
            name,
            image,
            socket_dir,
            self._settings.memory_mb,
            self._forget,
        )
        self._instances[container.id] = instance

        # 3. Hand it over only once its runner is loaded and waiting.
        try:
            try:
                await container.start()
            except DockerError as exc:
                raise BackendError(
                    f"cannot start container {name}: {exc.message}"
                ) from exc
            await instance.wait_ready()
        except BaseException:
            await instance.aclose()
            raise
        logger.debug("instance %s ready (%s)", name, container.id[:12])
        return instance

    def _forget(self, instance: DockerInstance) -> None:
        self._instances.pop(instance.container_id, None)

    # -- events --------------------------------------------------------------------

    async def _open_events(self) -> aiohttp.ClientResponse:
        filters = {
            "type": ["container"],
            "label": [f"{OWNER_LABEL}={self._owner}"],
            "event": ["die", "oom"],
        }
        # The response stays open in the events task. It returns once the
        # engine has subscribed us, so no event of a later container is missed.
        response: aiohttp.ClientResponse = await self.docker._do_query(
            "events",
            "GET",
            params={"filters": json.dumps(filters)},
            timeout=aiohttp.ClientTimeout(),
        )
        return response

    async def _serve_events(self, response: aiohttp.ClientResponse) -> None:
        while True:
            try:
                async for line in response.content:
                    self._dispatch_event(line)
            except (aiohttp.ClientError, OSError) as exc:
                logger.warning("docker events stream broke: %s", exc)
            finally:
                response.close()
            if self._closed:
                return
            # The stream ended (engine restart?): what died meanwhile is
            # unknown, so mark the instances by asking, then subscribe again.
            await asyncio.sleep(EVENTS_RETRY_S)
            await self._refresh_states()
            try:
                response = await self._open_events()
            except (DockerError, aiohttp.ClientError, OSError) as exc:
                logger.warning("cannot reopen the docker events stream: %s", exc)
                response = await self._retry_open_events()

    async def _retry_open_events(self) -> aiohttp.ClientResponse:
        while True:
            await asyncio.sleep(EVENTS_RETRY_S)
            with contextlib.suppress(DockerError, aiohttp.ClientError, OSError):
                return await self._open_events()

    async def _refresh_states(self) -> None:
        for instance in list(self._instances.values()):
            state = await instance._inspect_state()
            if state is None or not state.get("Running"):
                instance.on_event("die", {"exitCode": (state or {}).get("ExitCode")})

    def _dispatch_event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        actor = event.get("Actor") or {}
        instance = self._instances.get(str(actor.get("ID", "")))
        if instance is None:
            return
        action = str(event.get("Action") or event.get("status") or "")
        logger.debug("event %s on %s", action, instance.id)
        instance.on_event(action, actor.get("Attributes") or {})
