"""veritech's configuration, with the defaults documented in docs/configuration.md."""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass, field

from veritech.secrets import Keyring
from veritech.server.relay import OutputLimits


def new_instance_id() -> str:
    host = socket.gethostname().split(".")[0][:24] or "host"
    return f"{host}-{secrets.token_hex(4)}"


@dataclass(slots=True)
class DockerSettings:
    default_image: str | None = None
    memory_mb: int = 512
    cpus: float = 1.0
    pids_limit: int = 128
    tmp_size_mb: int = 64
    keep_warm_s: float = 300.0
    # V8 heap limit; None derives it from memory_mb (docs/docker.md).
    heap_mb: int | None = None
    watch_timeout_s: float = 10.0
    pull_timeout_s: float = 300.0
    # Where per-container socket directories live; None: a per-uid temp dir.
    runtime_dir: str | None = None


@dataclass(slots=True)
class VeritechConfig:
    nats_url: str
    subject_prefix: str = ""
    backend: str = "process"
    pool_size: int = 4
    # 1 = single use: each instance serves one execution and is thrown away.
    # More lets an instance (its cyclone, sandbox or container) serve that many
    # executions, each still in a fresh runner process; see docs/security.md.
    executions_per_instance: int = 1
    images: list[str] = field(default_factory=list)
    default_timeout_ms: int = 30_000
    max_timeout_ms: int = 300_000
    heartbeat_interval_s: float = 5.0
    # veritech's own deadline runs this much past cyclone's, so cyclone's
    # precise timeout fires first; this one only catches a wedged instance.
    timeout_grace_s: float = 2.0
    shutdown_grace_s: float = 10.0
    nats_connect_timeout_s: float = 10.0
    output: OutputLimits = field(default_factory=OutputLimits)
    memory_mb: int = 256
    sandbox: bool = True
    keyring: Keyring | None = None
    instance_id: str = field(default_factory=new_instance_id)
    docker: DockerSettings = field(default_factory=DockerSettings)

    def subject(self, name: str) -> str:
        return f"{self.subject_prefix}{name}"

    def effective_timeout_ms(self, requested: int | None) -> int:
        return min(requested or self.default_timeout_ms, self.max_timeout_ms)
