"""``veritech``: run a function, serve requests, kill, status, keys, images.

Exit codes: 0 success, 1 the function (or the operation) failed, 2 usage or
input errors. Errors are one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from veritech import __version__
from veritech.client import make_request, open_client
from veritech.errors import (
    InvalidRequest,
    RequestTooLarge,
    SecretError,
    VeritechError,
)
from veritech.natsd import open_nats_server
from veritech.secrets import Keyring, PublicKeyInfo, seal
from veritech.server.config import DockerSettings, VeritechConfig
from veritech.server.relay import OutputLimits
from veritech.server.server import open_veritech
from veritech.wire import (
    HANDLER_PATTERN,
    MAX_NESTING,
    Kind,
    ResponseType,
    decode_json,
    nesting_depth,
)

T = TypeVar("T")
NATS_URL_ENV = "VERITECH_NATS_URL"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
KINDS = [k.value for k in Kind]
# A day: far above any server's maximum (which clamps), and finite.
MAX_TIMEOUT_S = 86_400.0
LEVEL_STYLES = {"debug": "dim", "info": "", "warn": "yellow", "error": "bold red"}

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _print_error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")


def _fail_input(message: str) -> NoReturn:
    _print_error(message)
    sys.exit(2)


def _setup_logging(verbose: int, default: int = logging.WARNING) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else default
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # nats-py reports every reconnect attempt on ERROR; veritech says it once.
    logging.getLogger("nats").setLevel(max(level, logging.CRITICAL))


async def _cancel_on_sigterm(coro: Coroutine[Any, Any, T]) -> T:
    # SIGTERM unwinds like Ctrl-C: the main task is cancelled, so every
    # `async with` closes and the embedded nats-server and instances stop.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await coro


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(_cancel_on_sigterm(coro))
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except asyncio.CancelledError:
        err.print("terminated")
        sys.exit(143)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="veritech")
def main() -> None:
    """Veritech runs untrusted functions in sandboxed cyclone instances.

    Requests travel over NATS; `veritech serve` dispatches them, `veritech run`
    executes one function (with an embedded NATS and veritech unless
    --nats-url is given).
    """


# -- run ---------------------------------------------------------------------


def _load_args(value: str | None) -> Any:
    if value is None:
        return None
    data = value.encode("utf-8", "surrogateescape")
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            data = path.read_bytes()
        except OSError as exc:
            _fail_input(f"cannot read --args file {path}: {exc.strerror}")
    # The same decoding veritech applies: UTF-8, strict JSON, bounded nesting.
    try:
        document = decode_json(data)
        if nesting_depth(document) > MAX_NESTING:
            raise InvalidRequest(f"nested more than {MAX_NESTING} levels deep")
    except InvalidRequest as exc:
        cause = exc.__cause__
        if isinstance(cause, json.JSONDecodeError):
            _fail_input(
                f"--args is not valid JSON: {cause.msg} "
                f"(line {cause.lineno}, column {cause.colno})"
            )
        _fail_input(f"--args: {exc.message}")
    return document


def _parse_secrets(values: tuple[str, ...]) -> dict[str, str]:
    secrets: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            _fail_input(f"--secret expects NAME=VALUE, got {item!r}")
        secrets[name] = value
    return secrets


def _print_message(message: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out.print(json.dumps(message, ensure_ascii=False), markup=False)
        return
    kind = message.get("type")
    if kind == "output":
        level = str(message.get("level", "info"))
        style = LEVEL_STYLES.get(level, "")
        prefix = f"[dim]{escape(str(message.get('stream')))}[/] {level:<5}"
        text = escape(str(message.get("message", "")))
        out.print(f"{prefix} [{style}]{text}[/]" if style else f"{prefix} {text}")
    elif kind == "result":
        stats = message.get("stats") or {}
        timing = f"(queue {stats.get('queue_ms')} ms, run {stats.get('run_ms')} ms)"
        if message.get("status") == "success":
            unset = " (unset)" if message.get("unset") else ""
            out.print(f"[bold green]success[/]{unset} [dim]{timing}[/]")
            out.print(
                json.dumps(message.get("data"), indent=2, ensure_ascii=False),
                markup=False,
            )
        else:
            error = message.get("error") or {}
            name = f" {error['name']}" if error.get("name") else ""
            out.print(
                f"[bold red]failure[/] {escape(str(error.get('kind')))}{escape(name)} "
                f"[dim]{timing}[/]"
            )
            out.print(escape(str(error.get("message"))))


@contextlib.asynccontextmanager
async def _embedded_stack(
    backend: str, subject_prefix: str, keyring: Keyring | None
) -> AsyncIterator[str]:
    """A bundled nats-server and a one-instance veritech, for one run."""
    async with open_nats_server() as url:
        config = VeritechConfig(
            nats_url=url,
            subject_prefix=subject_prefix,
            backend=backend,
            pool_size=1,
            keyring=keyring,
            shutdown_grace_s=0,
        )
        async with open_veritech(config):
            yield url


@main.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--kind", type=click.Choice(KINDS), default="resolver", show_default=True)
@click.option("--handler", default="main", show_default=True, help="Function to call.")
@click.option(
    "--args", "args_value", metavar="JSON|@FILE", help="The handler's argument."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.001, max=MAX_TIMEOUT_S),
    help="Seconds (server default 30).",
)
@click.option(
    "--language",
    type=click.Choice(["javascript", "typescript"]),
    help="Default: from the file's extension.",
)
@click.option(
    "--response-type",
    type=click.Choice([t.value for t in ResponseType]),
    help="Expected type of a resolver's value.",
)
@click.option(
    "--secret",
    "secret_items",
    multiple=True,
    metavar="NAME=VALUE",
    help="A secret for the function (sealed before it is sent).",
)
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="veritech's public key file, to seal --secret with --nats-url.",
)
@click.option(
    "--nats-url", envvar=NATS_URL_ENV, help=f"Use this NATS (env {NATS_URL_ENV})."
)
@click.option(
    "--subject-prefix", default="", help="Prefix of every subject, e.g. 'dev.'."
)
@click.option(
    "--backend",
    type=click.Choice(["process", "docker"]),
    default="process",
    show_default=True,
    help="Backend of the embedded veritech.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print each reply message as JSON."
)
@click.option("-v", "--verbose", count=True, help="Show veritech's logs (-vv: debug).")
def run(
    file: Path,
    kind: str,
    handler: str,
    args_value: str | None,
    timeout: float | None,
    language: str | None,
    response_type: str | None,
    secret_items: tuple[str, ...],
    public_key: Path | None,
    nats_url: str | None,
    subject_prefix: str,
    backend: str,
    as_json: bool,
    verbose: int,
) -> None:
    """Execute the function in FILE and print its output and result."""
    _setup_logging(verbose)
    try:
        code = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail_input(f"no such file: {file}")
    except (OSError, UnicodeDecodeError) as exc:
        _fail_input(f"cannot read {file}: {exc}")
    if not code.strip():
        _fail_input(f"{file} is empty")
    if not re.match(HANDLER_PATTERN, handler):
        _fail_input(f"--handler {handler!r} is not a JavaScript identifier")
    if timeout is not None and not math.isfinite(timeout):
        _fail_input("--timeout must be a finite number of seconds")
    args = _load_args(args_value)
    secrets = _parse_secrets(secret_items)
    if language is None:
        language = "typescript" if file.suffix in (".ts", ".mts") else "javascript"

    # Secrets are sealed here, on the client side; the embedded veritech gets a
    # key pair made for this run only.
    keyring: Keyring | None = None
    sealed: dict[str, dict[str, str]] | None = None
    if secrets:
        if nats_url:
            if public_key is None:
                _fail_input("--secret with --nats-url needs --public-key")
            try:
                public = PublicKeyInfo.load(public_key)
            except (OSError, ValueError, KeyError) as exc:
                _fail_input(f"cannot read public key {public_key}: {exc}")
        else:
            keyring = Keyring.generate()
            public = keyring.public
        sealed = {name: seal(value, public) for name, value in secrets.items()}

    request = make_request(
        code,
        handler=handler,
        args=args,
        language=language,
        timeout_ms=round(timeout * 1000) if timeout else None,
        response_type=response_type,
        secrets=sealed,
    )

    async def go() -> int:
        stack: contextlib.AbstractAsyncContextManager[str]
        if nats_url:
            stack = contextlib.nullcontext(nats_url)
        else:
            stack = _embedded_stack(backend, subject_prefix, keyring)
        async with (
            stack as url,
            open_client(url, subject_prefix=subject_prefix) as client,
        ):
            result: dict[str, Any] = {}
            async for message in client.execute(kind, request):
                if message.get("type") != "heartbeat" or as_json:
                    _print_message(message, as_json)
                result = message
            return 0 if result.get("status") == "success" else 1

    sys.exit(_run_client(go))


def _run_client(go: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        return _run_async(go())
    except RequestTooLarge as exc:
        _print_error(str(exc))
        return 2
    except VeritechError as exc:
        _print_error(str(exc))
        return 1
    except (OSError, TimeoutError) as exc:
        _print_error(f"cannot reach NATS: {str(exc) or type(exc).__name__}")
        return 1
    except Exception as exc:
        if type(exc).__module__.startswith("nats"):
            _print_error(f"NATS: {str(exc) or type(exc).__name__}")
            return 1
        raise


# -- serve -------------------------------------------------------------------


@main.command()
@click.option(
    "--nats-url",
    envvar=NATS_URL_ENV,
    help=f"NATS to serve (env {NATS_URL_ENV}); default: start the bundled one.",
)
@click.option(
    "--subject-prefix", default="", help="Prefix of every subject, e.g. 'dev.'."
)
@click.option(
    "--backend",
    type=click.Choice(["process", "docker"]),
    default="process",
    show_default=True,
)
@click.option(
    "--pool-size",
    type=click.IntRange(min=1, max=256),
    default=4,
    show_default=True,
    help="Ready instances kept per image.",
)
@click.option(
    "--executions-per-instance",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Executions one instance serves before it is thrown away (1: single use).",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    help="Image to keep a pool of (docker; repeatable). Default: the cyclone image.",
)
@click.option(
    "--default-timeout-ms",
    type=click.IntRange(min=1),
    default=30_000,
    show_default=True,
)
@click.option(
    "--max-timeout-ms", type=click.IntRange(min=1), default=300_000, show_default=True
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0.05),
    default=5.0,
    show_default=True,
    help="Seconds between heartbeats.",
)
@click.option(
    "--max-output-lines", type=click.IntRange(min=1), default=10_000, show_default=True
)
@click.option(
    "--max-line-bytes",
    type=click.IntRange(min=64),
    default=64 * 1024,
    show_default=True,
)
@click.option(
    "--memory-mb",
    type=click.IntRange(min=16),
    default=256,
    show_default=True,
    help="Memory per execution (process: V8 heap; docker: see --docker-memory-mb).",
)
@click.option(
    "--docker-memory-mb", type=click.IntRange(min=32), default=512, show_default=True
)
@click.option(
    "--docker-cpus", type=click.FloatRange(min=0.01), default=1.0, show_default=True
)
@click.option(
    "--docker-pids-limit", type=click.IntRange(min=8), default=128, show_default=True
)
@click.option(
    "--no-sandbox", is_flag=True, help="process backend: do not use bubblewrap."
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Private key to open sealed secrets (see `veritech keygen`).",
)
@click.option(
    "--instance-id",
    help="This veritech's id (labels its containers). Default: host name + random.",
)
@click.option(
    "-v", "--verbose", count=True, help="-v: lifecycle (default), -vv: debug."
)
def serve(
    nats_url: str | None,
    subject_prefix: str,
    backend: str,
    pool_size: int,
    executions_per_instance: int,
    images: tuple[str, ...],
    default_timeout_ms: int,
    max_timeout_ms: int,
    heartbeat_interval: float,
    max_output_lines: int,
    max_line_bytes: int,
    memory_mb: int,
    docker_memory_mb: int,
    docker_cpus: float,
    docker_pids_limit: int,
    no_sandbox: bool,
    key_file: Path | None,
    instance_id: str | None,
    verbose: int,
) -> None:
    """Serve function requests until SIGTERM or Ctrl-C."""
    _setup_logging(verbose, default=logging.INFO)
    if default_timeout_ms > max_timeout_ms:
        _fail_input("--default-timeout-ms is larger than --max-timeout-ms")
    keyring = None
    if key_file is not None:
        try:
            keyring = Keyring.load(key_file)
        except SecretError as exc:
            _fail_input(str(exc))

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        stack: contextlib.AbstractAsyncContextManager[str]
        if nats_url:
            stack = contextlib.nullcontext(nats_url)
        else:
            stack = open_nats_server()
        async with stack as url:
            config = VeritechConfig(
                nats_url=url,
                subject_prefix=subject_prefix,
                backend=backend,
                pool_size=pool_size,
                executions_per_instance=executions_per_instance,
                images=list(images),
                default_timeout_ms=default_timeout_ms,
                max_timeout_ms=max_timeout_ms,
                heartbeat_interval_s=heartbeat_interval,
                output=OutputLimits(max_output_lines, max_line_bytes),
                memory_mb=memory_mb,
                sandbox=not no_sandbox,
                keyring=keyring,
                docker=DockerSettings(
                    memory_mb=docker_memory_mb,
                    cpus=docker_cpus,
                    pids_limit=docker_pids_limit,
                ),
            )
            if instance_id:
                config.instance_id = instance_id
            async with open_veritech(config):
                await stop.wait()

    try:
        _run_async(go())
    except (VeritechError, OSError) as exc:
        _print_error(str(exc))
        sys.exit(1)


# -- kill / status -------------------------------------------------------------


@main.command()
@click.argument("execution_id")
@click.option(
    "--nats-url", envvar=NATS_URL_ENV, default=DEFAULT_NATS_URL, show_default=True
)
@click.option("--subject-prefix", default="")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds to wait for the owning instance to answer.",
)
def kill(execution_id: str, nats_url: str, subject_prefix: str, timeout: float) -> None:
    """Stop a running execution."""

    async def go() -> int:
        async with open_client(nats_url, subject_prefix=subject_prefix) as client:
            if await client.kill(execution_id, timeout):
                out.print(f"killed {escape(execution_id)}")
                return 0
            err.print(f"no instance is running execution {escape(execution_id)}")
            return 1

    sys.exit(_run_client(go))


@main.command()
@click.option(
    "--nats-url", envvar=NATS_URL_ENV, default=DEFAULT_NATS_URL, show_default=True
)
@click.option("--subject-prefix", default="")
@click.option(
    "--window",
    type=click.FloatRange(min=0.05),
    default=0.5,
    show_default=True,
    help="Seconds to gather answers.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the raw answers as JSON lines."
)
def status(nats_url: str, subject_prefix: str, window: float, as_json: bool) -> None:
    """Show every veritech instance's state."""

    async def go() -> int:
        async with open_client(nats_url, subject_prefix=subject_prefix) as client:
            answers = await client.status(window)
        if as_json:
            for answer in answers:
                out.print(json.dumps(answer), markup=False)
            return 0
        if not answers:
            err.print("no veritech instance answered")
            return 1
        out.print(status_table(answers))
        return 0

    sys.exit(_run_client(go))


def status_table(answers: list[dict[str, Any]]) -> Table:
    table = Table("instance", "backend", "running", "pool ready/size", "version")
    for answer in answers:
        pools = answer.get("pool") or {}
        pool_text = ", ".join(
            f"{image} {p.get('ready')}/{p.get('size')}" for image, p in pools.items()
        )
        table.add_row(
            str(answer.get("instance")),
            str(answer.get("backend")),
            str(answer.get("running")),
            pool_text or "-",
            str(answer.get("version")),
        )
    return table


# -- keys, images ----------------------------------------------------------------


@main.command()
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("."),
    show_default=True,
)
@click.option("--name", default="veritech", show_default=True, help="File name stem.")
def keygen(out_dir: Path, name: str) -> None:
    """Make a key pair: NAME.key (private, mode 600) and NAME.pub."""
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if private.exists():
        _fail_input(f"{private} exists; refusing to overwrite a key")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        keyring = Keyring.generate()
        keyring.save(private, public)
    except OSError as exc:
        _fail_input(f"cannot write keys: {exc}")
    out.print(f"key id {keyring.public.key_id}: wrote {private} and {public}")


@main.group()
def image() -> None:
    """Build the cyclone container image (docker backend)."""


@image.command("build")
@click.option(
    "--tag", default=None, help="Image reference (default veritech/cyclone:VERSION)."
)
@click.option("--rebuild-base", is_flag=True, help="Make the Debian base again.")
@click.option("-v", "--verbose", count=True)
def image_build(tag: str | None, rebuild_base: bool, verbose: int) -> None:
    """Build the image without pulling anything (debootstrap base, local wheels)."""
    _setup_logging(verbose, default=logging.INFO)
    from veritech.image import build_image

    try:
        ref = build_image(tag, rebuild_base=rebuild_base)
    except VeritechError as exc:
        _print_error(str(exc))
        sys.exit(1)
    out.print(f"built {ref}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
