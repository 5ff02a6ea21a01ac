"""The backend interface and the connection veritech keeps to each instance.

A backend starts cyclone instances that listen on a Unix socket and reports,
once an instance is gone, what it knows about why (an OOM kill, say). The pool
decides when to start and discard them; the server decides what to send.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from pathlib import Path

import aiohttp

from veritech.wire import ErrorKind

logger = logging.getLogger("veritech.backend")

READY_POLL_S = 0.02
READY_TIMEOUT_S = 60.0


class InstanceConnection:
    """HTTP/WebSocket access to one cyclone over its Unix socket.

    It holds a /watch session open for as long as the instance is kept, so a
    cyclone started with a watch timeout exits by itself if veritech dies.
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(socket_path)),
            timeout=aiohttp.ClientTimeout(total=None, connect=5),
        )
        self._watch: aiohttp.ClientWebSocketResponse | None = None

    async def is_ready(self) -> bool:
        try:
            async with self._session.get("http://cyclone/readiness") as response:
                return response.status == 200
        except (aiohttp.ClientError, OSError):
            return False

    async def open_watch(self) -> None:
        self._watch = await self._session.ws_connect(
            "http://cyclone/watch", heartbeat=None
        )

    async def open_execution(self, kind: str) -> aiohttp.ClientWebSocketResponse:
        return await self._session.ws_connect(
            f"http://cyclone/execute/{kind}", heartbeat=None, max_msg_size=0
        )

    async def aclose(self) -> None:
        # Closing the session drops the sockets without a WebSocket close
        # handshake: the instance is being discarded, and a handshake with a
        # cyclone that already exited would only wait for its timeout.
        await self._session.close()


class Instance(ABC):
    """One started cyclone, owned by veritech until it is discarded."""

    def __init__(self, instance_id: str, image: str, socket_path: Path) -> None:
        self.id = instance_id
        self.image = image
        self.executions = 0
        self.connection = InstanceConnection(socket_path)

    @property
    @abstractmethod
    def alive(self) -> bool:
        """Whether the instance's process or container still runs."""

    async def wait_ready(
        self, timeout_s: float = READY_TIMEOUT_S, *, reopen_watch: bool = True
    ) -> None:
        """Poll /readiness until 200; BackendError if it dies or times out.

        The first time, the /watch session is opened too; a reused instance
        keeps the one it has (``reopen_watch=False``).
        """
        from veritech.errors import BackendError

        try:
            async with asyncio.timeout(timeout_s):
                while not await self.connection.is_ready():
                    if not self.alive:
                        detail = await self.describe_failure()
                        raise BackendError(
                            f"instance {self.id} exited before it was ready: {detail}"
                        )
                    await asyncio.sleep(READY_POLL_S)
        except TimeoutError:
            raise BackendError(
                f"instance {self.id} was not ready within {timeout_s:.0f}s"
            ) from None
        if reopen_watch:
            await self.connection.open_watch()

    async def describe_failure(self) -> str:
        """Human-readable last words of an instance that failed to start."""
        return "no detail available"

    async def exit_reason(self) -> tuple[ErrorKind, str] | None:
        """What is known of why the instance ended mid-execution (OOM kill...)."""
        return None

    @abstractmethod
    async def kill(self) -> None:
        """Stop the instance at once (the kill and timeout paths)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Stop the instance and remove everything it left; idempotent."""


class Backend(ABC):
    name: str
    # Single use (the default): cyclone serves one execution and exits. Off,
    # cyclone starts a fresh runner after each execution and the pool may lend
    # the instance again (VeritechConfig.executions_per_instance).
    single_use: bool = True

    @abstractmethod
    async def start(self) -> None:
        """Prepare the backend and sweep what an earlier crash left behind."""

    async def prepare_image(self, image: str) -> None:
        """Make sure instances of ``image`` can be started (pull it, say).

        Raises ImageUnavailable when it cannot be had.
        """

    def default_image(self) -> str:
        return "local"

    def image_for(self, image: str | None, tag: str | None) -> str:
        """The image reference for a request's container_image/container_tag.

        A reference that already carries a tag ignores ``tag``.
        """
        if image is None:
            return self.default_image()
        if tag is None or ":" in image.rsplit("/", 1)[-1]:
            return image
        return f"{image}:{tag}"

    @abstractmethod
    async def start_instance(self, image: str) -> Instance:
        """Start one instance and return it once it is ready."""

    @abstractmethod
    async def aclose(self) -> None:
        """Remove every instance and resource this backend still owns."""
