"""``cyclone serve``: the in-sandbox execution server."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path

import click

from veritech.cyclone.runner import RunnerConfig, default_deno
from veritech.cyclone.server import CycloneConfig, serve_cyclone


def _parse_addr(_: click.Context, __: click.Parameter, value: str | None) -> object:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise click.BadParameter("expected HOST:PORT, for example 127.0.0.1:5157")
    return (host.strip("[]"), int(port))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """cyclone: runs one function at a time with its language runner."""


@main.command()
@click.option("--bind-uds", type=click.Path(path_type=Path), help="Unix socket path.")
@click.option(
    "--bind-addr", callback=_parse_addr, help="TCP address HOST:PORT (loopback)."
)
@click.option("--oneshot", is_flag=True, help="Serve one execution, then exit.")
@click.option(
    "--watch-timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Exit when no /watch session has been open for this many seconds.",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0.05),
    default=5.0,
    show_default=True,
    help="Seconds between heartbeat frames during an execution.",
)
@click.option(
    "--memory-mb",
    type=click.IntRange(min=16),
    default=256,
    show_default=True,
    help="V8 heap limit of the runner.",
)
@click.option(
    "--default-timeout-ms",
    type=click.IntRange(min=1),
    default=30_000,
    show_default=True,
    help="Timeout of a request that names none.",
)
@click.option(
    "--socket-mode",
    default="600",
    show_default=True,
    help="Octal mode of the Unix socket.",
)
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Private scratch directory (default: a new temporary one).",
)
@click.option("--deno", default=None, help="Path of the deno binary.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: wire).")
def serve(
    bind_uds: Path | None,
    bind_addr: tuple[str, int] | None,
    oneshot: bool,
    watch_timeout: float | None,
    heartbeat_interval: float,
    memory_mb: int,
    default_timeout_ms: int,
    socket_mode: str,
    work_dir: Path | None,
    deno: str | None,
    verbose: int,
) -> None:
    """Serve /liveness, /readiness, /execute/<kind> and /watch."""
    if (bind_uds is None) == (bind_addr is None):
        raise click.UsageError("give exactly one of --bind-uds and --bind-addr")
    try:
        mode = int(socket_mode, 8)
    except ValueError:
        raise click.BadParameter("expected an octal mode such as 600") from None
    logging.basicConfig(
        level=logging.DEBUG
        if verbose > 1
        else logging.INFO
        if verbose
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with tempfile.TemporaryDirectory(prefix="cyclone-") as scratch:
        config = CycloneConfig(
            runner=RunnerConfig(
                deno=deno or default_deno(),
                work_dir=work_dir or Path(scratch),
                memory_mb=memory_mb,
            ),
            bind_uds=bind_uds,
            oneshot=oneshot,
            watch_timeout_s=watch_timeout or None,
            heartbeat_interval_s=heartbeat_interval,
            default_timeout_ms=default_timeout_ms,
            socket_mode=mode,
        )
        if bind_addr is not None:
            config.bind_host, config.bind_port = bind_addr
        code = _serve_and_exit_code(config)
        shutil.rmtree(scratch, ignore_errors=True)
    # cyclone is thrown away once it has served: exit at once rather than
    # wait on stray tasks. asyncio.run would wait for every cancelled task to
    # finish, and a handler of a broken session that swallowed its
    # cancellation would keep an orphan cyclone alive.
    logging.shutdown()
    os._exit(code)


def _serve_and_exit_code(config: CycloneConfig) -> int:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve_cyclone(config))
    except Exception:
        logging.getLogger("cyclone.server").exception("cyclone failed")
        return 1
    return 0
