"""Latency and throughput of a trivial resolver, beside the floors under it.

One run brings up the embedded stack (the bundled nats-server, one veritech on
the process backend, the client library) and measures, on loopback only:

- warm latency: one request at a time, each sent once the pool is full again,
  so no instance start competes with it for the CPU;
- back-to-back latency: one request at a time without waiting for the pool,
  as a caller in a loop sees it (replacement starts run meanwhile);
- concurrent latency and throughput: C requests in flight at once;

and beside them, in the same run, the floors those figures sit on:

- a bare ``deno run`` of the same function as a fresh process (what running
  the function would cost without a pre-started runner);
- a NATS request/reply round trip on the same nats-server;
- the start of one cyclone instance until it is ready (what a cold start costs,
  and the rate at which a single-use pool can be refilled).

The docker rows (``--backend docker``) live in their own section so that they
can grow without touching the process rows.

Usage::

    .venv/bin/python benchmarks/latency.py [--requests N] [--concurrency C]
        [--pool-size P] [--backend process|docker]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import math
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rich.console import Console
from rich.table import Table

from veritech.backends.process import ProcessBackend
from veritech.client import Client, make_request
from veritech.cyclone.runner import default_deno
from veritech.natsd import open_nats_server
from veritech.server.config import VeritechConfig
from veritech.server.server import Veritech, open_veritech

logger = logging.getLogger("veritech.benchmark")

CODE = "function main(a){ return a + 1 }"
ARG = 41
EXPECTED = 42

# Deno flags of the bare-process floor: the ones cyclone's runner uses, so the
# floor differs from a runner start only by the runner's own work.
DENO_FLAGS = [
    "run",
    "--quiet",
    "--no-prompt",
    "--no-config",
    "--no-lock",
    "--no-remote",
    "--no-npm",
]

POOL_FULL_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_MS = 30_000


# -- figures -------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    """Durations in seconds of one measured thing."""

    name: str
    seconds: list[float] = field(default_factory=list)
    # How a ratio column names this sample when it is a floor.
    short: str = ""

    def percentile(self, p: float) -> float:
        # Nearest rank: with 50 samples p99 is the slowest one, which is
        # what a reader of p99 expects from so few samples.
        ordered = sorted(self.seconds)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds)


@dataclass(slots=True)
class Row:
    """One table row: a figure, and the floors it is compared with."""

    sample: Sample
    floors: list[Sample] = field(default_factory=list)
    note: str = ""


@dataclass(slots=True)
class Report:
    rows: list[Row] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


_CLOCK_START = time.perf_counter()


def step(text: str) -> None:
    """Say on stderr what is being measured, so a slow phase is visible."""
    elapsed = time.perf_counter() - _CLOCK_START
    print(f"[{elapsed:6.1f}s] {text}", file=sys.stderr, flush=True)


async def timed(
    count: int, one: Callable[[], Awaitable[None]], sample: Sample
) -> Sample:
    """Run ``one`` ``count`` times in sequence, recording each wall time."""
    for _ in range(count):
        begin = time.perf_counter()
        await one()
        sample.seconds.append(time.perf_counter() - begin)
    return sample


# -- floors ----------------------------------------------------------------------


async def deno_floor(count: int) -> Sample:
    """A fresh ``deno run`` of the same function, start to exit."""
    deno = default_deno()
    with tempfile.TemporaryDirectory(prefix="veritech-bench-deno-") as scratch:
        script = Path(scratch) / "main.js"
        script.write_text(f"{CODE}\nconsole.log(JSON.stringify(main({ARG})));\n")
        env = {
            "DENO_DIR": str(Path(scratch) / "deno"),
            "NO_COLOR": "1",
            "DENO_NO_UPDATE_CHECK": "1",
            "HOME": scratch,
            "PATH": "/usr/bin:/bin",
        }

        async def one() -> None:
            process = await asyncio.create_subprocess_exec(
                deno,
                *DENO_FLAGS,
                str(script),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=scratch,
            )
            out, errors = await process.communicate()
            if process.returncode != 0 or out.strip() != str(EXPECTED).encode():
                raise RuntimeError(f"deno run failed: {errors.decode()[-500:]}")

        # One unmeasured run warms the page cache and Deno's own cache dir.
        await one()
        return await timed(
            count, one, Sample("floor: deno run (fresh process)", short="deno run")
        )


async def nats_floor(url: str, count: int) -> Sample:
    """A request/reply round trip through the same nats-server."""
    async with _connect(url) as nc:
        subject = f"bench{secrets.token_hex(4)}.echo"

        async def respond(msg: Msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(subject, cb=respond)
        await nc.flush()
        payload = json.dumps(make_request(CODE, args=ARG)).encode()

        async def one() -> None:
            await nc.request(subject, payload, timeout=5)

        await one()
        return await timed(
            count, one, Sample("floor: NATS request/reply", short="NATS")
        )


async def instance_start_floor(count: int) -> Sample:
    """One cyclone instance (bubblewrap + Python + a loaded Deno runner) until
    ready, started through the process backend directly."""
    backend = ProcessBackend(f"bench-{secrets.token_hex(3)}")
    await backend.start()
    try:
        sample = Sample("cyclone instance start (cold start)")
        for _ in range(count):
            begin = time.perf_counter()
            instance = await backend.start_instance(backend.default_image())
            sample.seconds.append(time.perf_counter() - begin)
            # Discarding is not part of the start; it is kept out of the figure.
            await instance.aclose()
        return sample
    finally:
        await backend.aclose()


# -- the veritech figures ------------------------------------------------------------


@dataclass(slots=True)
class Stack:
    """The embedded stack under test, and the client speaking to it."""

    url: str
    server: Veritech
    client: Client
    queue_ms: list[float] = field(default_factory=list)
    run_ms: list[float] = field(default_factory=list)

    async def run_one(self, **fields: Any) -> None:
        request = make_request(
            CODE,
            args=ARG,
            response_type="integer",
            timeout_ms=REQUEST_TIMEOUT_MS,
            **fields,
        )
        result = await self.client.run("resolver", request)
        if result.get("status") != "success" or result.get("data") != EXPECTED:
            raise RuntimeError(f"unexpected result: {result}")
        stats = result.get("stats", {})
        self.queue_ms.append(float(stats.get("queue_ms", 0)))
        self.run_ms.append(float(stats.get("run_ms", 0)))

    def take_stats(self) -> tuple[list[float], list[float]]:
        stats = (self.queue_ms, self.run_ms)
        self.queue_ms, self.run_ms = [], []
        return stats


@contextlib.asynccontextmanager
async def _connect(url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(url, name="veritech benchmark")
    try:
        yield nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def open_stack(url: str, config: VeritechConfig) -> AsyncIterator[Stack]:
    async with open_veritech(config) as server, _connect(url) as nc:
        client = Client(nc, subject_prefix=config.subject_prefix)
        await server.pool.wait_full(POOL_FULL_TIMEOUT_S)
        yield Stack(url, server, client)


async def warm_latency(stack: Stack, count: int, name: str) -> Sample:
    """One request at a time, each sent once the pool is full again."""
    sample = Sample(name)
    for _ in range(count):
        await stack.server.pool.wait_full(POOL_FULL_TIMEOUT_S)
        begin = time.perf_counter()
        await stack.run_one()
        sample.seconds.append(time.perf_counter() - begin)
    return sample


async def back_to_back_latency(stack: Stack, count: int) -> Sample:
    """One request at a time without waiting for the pool to refill."""
    await stack.server.pool.wait_full(POOL_FULL_TIMEOUT_S)
    return await timed(
        count, stack.run_one, Sample("veritech back-to-back (pool refilling)")
    )


async def concurrent_load(
    stack: Stack, total: int, concurrency: int
) -> tuple[Sample, float]:
    """``total`` requests, ``concurrency`` in flight; latencies and executions/s."""
    await stack.server.pool.wait_full(POOL_FULL_TIMEOUT_S)
    sample = Sample(f"veritech concurrent (C={concurrency})")
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            begin = time.perf_counter()
            await stack.run_one()
            sample.seconds.append(time.perf_counter() - begin)

    begin = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    elapsed = time.perf_counter() - begin
    return sample, total / elapsed


def _stats_line(label: str, queue_ms: list[float], run_ms: list[float]) -> str:
    return (
        f"{label}: server-side queue_ms p50 {statistics.median(queue_ms):.0f} / "
        f"max {max(queue_ms):.0f}, run_ms p50 {statistics.median(run_ms):.0f} / "
        f"max {max(run_ms):.0f}"
    )


async def process_section(args: argparse.Namespace, report: Report) -> None:
    async with open_nats_server() as url:
        # 1. The floors first, on a quiet machine: no pool is starting yet.
        step(f"floor: {args.requests} fresh deno processes")
        deno = await deno_floor(args.requests)
        step(f"floor: {args.requests} NATS round trips")
        round_trip = await nats_floor(url, args.requests)
        starts = None
        if args.cold_starts > 0:
            step(f"floor: {args.cold_starts} cyclone instance starts")
            starts = await instance_start_floor(args.cold_starts)

        # 2. The stack under test.
        config = VeritechConfig(
            nats_url=url,
            subject_prefix=f"bench{secrets.token_hex(4)}.",
            pool_size=args.pool_size,
            executions_per_instance=args.executions_per_instance,
        )
        step(
            f"starting veritech (pool size {args.pool_size}, "
            f"{args.executions_per_instance} execution(s) per instance)"
        )
        async with open_stack(url, config) as stack:
            step(f"veritech: {args.requests} warm requests, one at a time")
            warm = await warm_latency(
                stack, args.requests, "veritech warm (pool full, sequential)"
            )
            warm_stats = stack.take_stats()
            step(f"veritech: {args.requests} back-to-back requests")
            back_to_back = await back_to_back_latency(stack, args.requests)
            b2b_stats = stack.take_stats()
            step(f"veritech: {args.total} requests, {args.concurrency} in flight")
            loaded, rate = await concurrent_load(stack, args.total, args.concurrency)
            load_stats = stack.take_stats()

    # 3. The table: each veritech figure against the floors under it.
    floors = [deno, round_trip]
    report.rows += [
        Row(warm, floors),
        Row(back_to_back, floors),
        Row(loaded, floors, "per request, under load"),
        Row(deno),
        Row(round_trip),
    ]
    if starts is not None:
        report.rows.append(Row(starts, [deno]))
    report.lines.append(
        f"throughput: {rate:.1f} executions/s ({args.total} requests, "
        f"concurrency {args.concurrency}, pool size {args.pool_size})"
    )
    if starts is not None:
        # Single-use instances: sustained throughput cannot beat the rate at
        # which replacements start, however many run side by side.
        report.lines.append(
            f"refill bound: one instance start takes {starts.mean * 1000:.0f} ms "
            f"(mean); {1 / starts.mean:.1f} starts/s one at a time"
        )
    report.lines += [
        _stats_line("warm", *warm_stats),
        _stats_line("back-to-back", *b2b_stats),
        _stats_line("concurrent", *load_stats),
    ]


# -- docker ----------------------------------------------------------------------


def docker_backend_available() -> bool:
    return importlib.util.find_spec("veritech.backends.docker") is not None


FLOOR_LABEL = "veritech.benchmark"


def _floor_container(image: str) -> dict[str, Any]:
    # The image's entry program is cyclone; ``true`` measures the container
    # machinery alone (what `docker run --rm --network none IMAGE true` costs).
    return {
        "Image": image,
        "Entrypoint": ["true"],
        "Cmd": [],
        "Labels": {FLOOR_LABEL: "floor"},
        "NetworkDisabled": True,
        "HostConfig": {"NetworkMode": "none"},
    }


async def docker_floors(image: str, count: int) -> tuple[Sample, Sample]:
    """``docker run --rm IMAGE true`` and the start of a created container,
    both through the Engine API as the backend uses it."""
    import aiodocker

    docker = aiodocker.Docker()
    run = Sample("floor: docker run --rm IMAGE true", short="docker run")
    start = Sample("floor: docker start (created container)", short="docker start")
    try:
        for _ in range(count):
            # Create, start, wait for the exit, remove: all of `run --rm`.
            begin = time.perf_counter()
            container = await docker.containers.create(_floor_container(image))
            try:
                await container.start()
                await container.wait()
            finally:
                await container.delete(force=True)
            run.seconds.append(time.perf_counter() - begin)

            # Only the start of a container created beforehand.
            container = await docker.containers.create(_floor_container(image))
            try:
                begin = time.perf_counter()
                await container.start()
                start.seconds.append(time.perf_counter() - begin)
                await container.wait()
            finally:
                await container.delete(force=True)
    finally:
        await docker.close()
    return run, start


async def docker_cold_starts(stack: Stack, image: str, count: int) -> Sample:
    """Requests for an image no pool holds yet: each pays a container start.

    Each sample names a fresh tag of the same image, so it is new to veritech
    while nothing is pulled; the tags are removed afterwards.
    """
    import aiodocker

    docker = aiodocker.Docker()
    repository, _, _ = image.rpartition(":")
    tags = [f"bench-cold-{secrets.token_hex(4)}" for _ in range(count)]
    sample = Sample("docker cold start (no ready instance)")
    try:
        for tag in tags:
            await docker.images.tag(image, repository, tag=tag)
        for tag in tags:
            await stack.server.pool.wait_full(POOL_FULL_TIMEOUT_S)
            begin = time.perf_counter()
            await stack.run_one(container_image=repository, container_tag=tag)
            sample.seconds.append(time.perf_counter() - begin)
    finally:
        for tag in tags:
            with contextlib.suppress(aiodocker.DockerError):
                await docker.images.delete(f"{repository}:{tag}", noprune=True)
        await docker.close()
    return sample


async def docker_section(args: argparse.Namespace, report: Report) -> None:
    """The docker rows: warm latency, cold start, sustained executions/s,
    beside ``docker run --rm IMAGE true`` and the start of a created container.
    """
    from veritech.backends.docker import default_image_ref

    image = args.image or default_image_ref()
    count = args.docker_requests
    async with open_nats_server() as url:
        # 1. The floors, before any container of veritech runs.
        step(f"docker floor: {count} x run --rm and start of {image}")
        run, start = await docker_floors(image, count)

        # 2. veritech on the docker backend with a pool of that image.
        config = VeritechConfig(
            nats_url=url,
            subject_prefix=f"bench{secrets.token_hex(4)}.",
            backend="docker",
            pool_size=args.pool_size,
            images=[image],
        )
        step(f"starting veritech on docker (pool size {args.pool_size})")
        async with open_stack(url, config) as stack:
            step(f"docker: {count} warm requests, one at a time")
            warm = await warm_latency(
                stack, count, "docker warm (pool full, sequential)"
            )
            warm_stats = stack.take_stats()
            step(f"docker: {args.cold_starts} cold starts")
            cold = await docker_cold_starts(stack, image, args.cold_starts)
            cold_stats = stack.take_stats()
            step(f"docker: {args.docker_total} requests, {args.concurrency} in flight")
            loaded, rate = await concurrent_load(
                stack, args.docker_total, args.concurrency
            )
            loaded.name = f"docker concurrent (C={args.concurrency})"
            load_stats = stack.take_stats()

    # 3. The rows, each beside the container floors.
    floors = [run, start]
    report.rows += [
        Row(warm, floors),
        Row(cold, floors),
        Row(loaded, floors, "per request, under load"),
        Row(run),
        Row(start),
    ]
    report.lines += [
        f"docker throughput: {rate:.1f} executions/s ({args.docker_total} "
        f"requests, concurrency {args.concurrency}, pool size {args.pool_size})",
        _stats_line("docker warm", *warm_stats),
        _stats_line("docker cold", *cold_stats),
        _stats_line("docker concurrent", *load_stats),
    ]


# -- output ------------------------------------------------------------------------


def render(report: Report, console: Console) -> None:
    table = Table(title="veritech latency (trivial resolver, loopback)")
    table.add_column("measured")
    for column in ("n", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(column, justify="right")
    table.add_column("p50 vs floors")
    for row in report.rows:
        s = row.sample
        ratios = ", ".join(
            f"{s.p50 / f.p50:.1f}x {f.short or f.name}" for f in row.floors
        )
        if row.note:
            ratios = f"{ratios} ({row.note})" if ratios else row.note
        table.add_row(
            s.name,
            str(len(s.seconds)),
            f"{s.p50 * 1000:.1f}",
            f"{s.p99 * 1000:.1f}",
            f"{s.mean * 1000:.1f}",
            ratios,
        )
    console.print(table)
    for line in report.lines:
        console.print(line)


def machine() -> str:
    cores = os.cpu_count() or 0
    return f"{platform.system()} {platform.machine()}, {cores} cores, {sys.version}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Latency and throughput of a trivial resolver through the "
        "embedded stack, beside the floors measured in the same run."
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=30,
        help="sequential requests per latency row, and samples per floor (default 30)",
    )
    parser.add_argument(
        "--total",
        type=int,
        default=60,
        help="requests in the concurrent run (default 60)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=20,
        help="requests in flight in the concurrent run (default 20)",
    )
    parser.add_argument(
        "--pool-size", type=int, default=4, help="veritech pool size (default 4)"
    )
    parser.add_argument(
        "--cold-starts",
        type=int,
        default=5,
        help="instance starts to time; 0 skips the row (default 5)",
    )
    parser.add_argument(
        "--executions-per-instance",
        type=int,
        default=1,
        help="process: executions one instance serves (default 1: single use)",
    )
    parser.add_argument(
        "--backend",
        choices=["process", "docker"],
        default="process",
        help="process: the embedded default; docker: add the docker rows",
    )
    parser.add_argument(
        "--image",
        default=None,
        help="docker: the cyclone image (default: the backend's default image)",
    )
    parser.add_argument(
        "--docker-requests",
        type=int,
        default=10,
        help="docker: warm requests, and samples per docker floor (default 10)",
    )
    parser.add_argument(
        "--docker-total",
        type=int,
        default=40,
        help="docker: requests in the sustained-load run (default 40)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=600.0,
        help="give up after this many seconds (default 600)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log veritech at INFO"
    )
    args = parser.parse_args(argv)
    for name in (
        "requests",
        "total",
        "concurrency",
        "pool_size",
        "executions_per_instance",
        "docker_requests",
        "docker_total",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


async def main_async(args: argparse.Namespace, console: Console) -> int:
    # 1. Refuse what this checkout cannot measure before spending a minute.
    if args.backend == "docker" and not docker_backend_available():
        console.print(
            "[bold red]error:[/] --backend docker: the docker backend "
            "(veritech.backends.docker) is not available in this checkout"
        )
        return 2

    # 2. Measure, within the overall time limit.
    report = Report()
    console.print(f"machine: {machine()}")
    begin = time.perf_counter()
    limit = asyncio.timeout(args.time_limit)
    try:
        async with limit:
            await process_section(args, report)
            if args.backend == "docker":
                await docker_section(args, report)
    except TimeoutError:
        if not limit.expired():
            raise
        console.print(f"[bold red]error:[/] gave up after {args.time_limit:.0f}s")
        return 1
    report.lines.append(f"benchmark wall time: {time.perf_counter() - begin:.1f}s")

    # 3. Print the table.
    render(report, console)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    # Wide enough for the table on one line per row, also when piped.
    console = Console(highlight=False, width=max(Console().width, 120))
    return asyncio.run(main_async(args, console))


if __name__ == "__main__":
    sys.exit(main())
