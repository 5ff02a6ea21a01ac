"""Pools of ready instances, one per image.

Each image pool keeps ``size`` instances started ahead of demand: taking one
starts its replacement at once, so a request pays for a cold start only when
demand outruns the pool. Instances are single use; the server discards each
one after its execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

from veritech.backends.base import Backend, Instance
from veritech.errors import BackendError

logger = logging.getLogger("veritech.pool")

# After a failed start, wait before the next try, doubling up to the cap, so a
# broken backend is not hammered while requests wait for their deadlines.
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0
# A reused instance starts a fresh runner after each execution; one that is
# not ready again within this long is discarded instead.
REUSE_READY_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class PoolStatus:
    ready: int
    size: int
    starting: int
    started: int


class ImagePool:
    def __init__(
        self, backend: Backend, image: str, size: int, executions_per_instance: int = 1
    ) -> None:
        self.image = image
        self.size = size
        self.executions_per_instance = executions_per_instance
        # Instances lent out that may come back (reuse); they count toward
        # size so the pool does not start replacements for them.
        self._lent: set[Instance] = set()
        self._started = 0
        self.last_used = time.monotonic()
        self._backend = backend
        self._ready: deque[Instance] = deque()
        self._waiters: deque[asyncio.Future[Instance]] = deque()
        self._starting: set[asyncio.Task[None]] = set()
        self._retry_s = 0.0
        self._closed = False
        self.last_error: BaseException | None = None

    def status(self) -> PoolStatus:
        return PoolStatus(
            len(self._ready), self.size, len(self._starting), self._started
        )

    def _short(self) -> bool:
        held = len(self._ready) + len(self._starting) + len(self._lent)
        return held < self.size

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def fill(self) -> None:
        """Start instances until ready + starting covers size and waiters."""
        if self._closed:
            return
        wanted = max(self.size, len(self._waiters))
        # At most `size` starts at a time: a burst of 200 waiters must not
        # start 200 instances at once; the host would thrash and their starts
        # would outlast cyclone's watch timeout. Each finished start refills.
        while (
            len(self._ready) + len(self._starting) + len(self._lent) < wanted
            and len(self._starting) < self.size
        ):
            task = asyncio.create_task(self._start_one())
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start_one(self) -> None:
        if self._retry_s:
            await asyncio.sleep(self._retry_s)
        try:
            instance = await self._backend.start_instance(self.image)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.last_error = exc
            self._retry_s = min(max(self._retry_s * 2, RETRY_FIRST_S), RETRY_MAX_S)
            logger.warning("instance of %s failed to start: %s", self.image, exc)
            # The task leaves the starting set only after this returns, so
            # schedule the replacement on the next loop iteration.
            asyncio.get_running_loop().call_soon(self.fill)
            return
        self._retry_s = 0.0
        self._started += 1
        self.last_error = None
        if self._closed:
            await instance.aclose()
            return
        # Leave the starting set before handing over: a waiter that gets this
        # instance refills the pool as soon as it runs, which is before this
        # task's done callback would remove it, and it must not count this
        # start as still pending (the pool would stay one short for good).
        this = asyncio.current_task()
        if this is not None:
            self._starting.discard(this)
        self._hand_over(instance)

    def _hand_over(self, instance: Instance) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(instance)
                return
        self._ready.append(instance)

    async def acquire(self) -> Instance:
        """A ready instance; waits (cancellable) while none is."""
        instance = await self._acquire()
        instance.executions += 1
        if instance.executions < self.executions_per_instance:
            self._lent.add(instance)
        # Refill only now: an instance that may come back must already count
        # as lent, or its replacement would be started for nothing.
        self.fill()
        return instance

    async def release(self, instance: Instance, reusable: bool) -> None:
        """Take back an instance after its execution: keep it or discard it."""
        if instance in self._lent:
            # A reusable instance comes back once cyclone has a fresh runner
            # waiting; until then it still counts toward the pool's size.
            if reusable and not self._closed and instance.alive:
                with contextlib.suppress(Exception):
                    await instance.wait_ready(REUSE_READY_TIMEOUT_S, reopen_watch=False)
                    self._lent.discard(instance)
                    # Back to a waiting request, or to the pool while it is
                    # short; a burst may have started extra instances, and a
                    # returning one beyond size is discarded, not hoarded.
                    if not self._closed and (self._waiters or self._short()):
                        self._hand_over(instance)
                        return
            self._lent.discard(instance)
        await instance.aclose()
        self.fill()

    async def _acquire(self) -> Instance:
        self.last_used = time.monotonic()
        while self._ready:
            instance = self._ready.popleft()
            if instance.alive:
                return instance
            logger.warning("ready instance %s had died; discarding it", instance.id)
            await instance.aclose()
        waiter: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.fill()
        try:
            instance = await waiter
        except asyncio.CancelledError:
            # An instance handed over just as the waiter gave up goes back.
            if waiter.done() and not waiter.cancelled():
                self._hand_over(waiter.result())
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            raise
        return instance

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        ready, self._ready = list(self._ready), deque()
        await asyncio.gather(*(i.aclose() for i in ready), return_exceptions=True)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(BackendError("the pool is closed"))


class Pool:
    """Image pools of one backend: configured images, and others on demand."""

    def __init__(
        self,
        backend: Backend,
        size: int,
        images: list[str] | None = None,
        *,
        keep_warm_s: float = 300.0,
        executions_per_instance: int = 1,
    ) -> None:
        self.backend = backend
        self.size = size
        self.keep_warm_s = keep_warm_s
        self.executions_per_instance = executions_per_instance
        backend.single_use = executions_per_instance <= 1
        self._configured = set(images or [backend.default_image()])
        self._pools: dict[str, ImagePool] = {}
        self._prepare_lock = asyncio.Lock()

    async def start(self) -> None:
        for image in sorted(self._configured):
            await self.backend.prepare_image(image)
            self._pools[image] = self._new_pool(image)
            self._pools[image].fill()

    async def acquire(self, image: str) -> Instance:
        pool = self._pools.get(image)
        if pool is None:
            # Pull (or check) the image once, however many requests ask for it.
            async with self._prepare_lock:
                pool = self._pools.get(image)
                if pool is None:
                    await self.backend.prepare_image(image)
                    pool = self._pools[image] = self._new_pool(image)
        return await pool.acquire()

    def _new_pool(self, image: str) -> ImagePool:
        return ImagePool(self.backend, image, self.size, self.executions_per_instance)

    async def release(self, instance: Instance, reusable: bool) -> None:
        """Give an instance back after its execution (see ImagePool.release)."""
        pool = self._pools.get(instance.image)
        if pool is None:
            await instance.aclose()
            return
        await pool.release(instance, reusable)

    def status(self) -> dict[str, PoolStatus]:
        return {image: pool.status() for image, pool in self._pools.items()}

    async def wait_full(self, timeout_s: float) -> None:
        """Wait until every pool has all its instances ready (tests, startup)."""
        async with asyncio.timeout(timeout_s):
            while any(s.ready < s.size for s in self.status().values()):
                await asyncio.sleep(0.02)

    async def expire_idle(self) -> None:
        """Close on-demand pools unused for keep_warm_s."""
        now = time.monotonic()
        for image, pool in list(self._pools.items()):
            if image in self._configured:
                continue
            if now - pool.last_used > self.keep_warm_s and not pool.waiting:
                del self._pools[image]
                await pool.aclose()

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(p.aclose() for p in pools), return_exceptions=True)
