"""The bubblewrap command line for a process-backend instance (pure).

What the sandbox gives cyclone and its runner: its own network namespace with
nothing in it (no network at all), its own PID/IPC/UTS/user namespaces, the
host's system directories and Python read-only and nothing else of the host's
file system, a private size-bounded /tmp, an empty environment, and death when
veritech (its parent) dies.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/sbin")
# nobody: the code inside runs without any identity of the host's.
SANDBOX_UID = 65534


def python_roots() -> list[str]:
    """Directories this Python and its packages live in (sys.prefix, src dirs).

    Not all of sys.path: its first entry is the script's directory or the
    working directory, which may be /tmp (the bind would hide the sandbox's
    private /tmp, and cyclone could not start) or / (the whole host file
    system would be readable inside).
    """
    package_root = Path(__file__).resolve().parents[2]
    roots = {sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parent)}
    roots.add(str(package_root))
    return sorted(roots)


def _collapse(paths: Iterable[str]) -> list[str]:
    """Drop paths already inside another listed path (one bind covers them)."""
    kept: list[str] = []
    for path in sorted({os.path.abspath(p) for p in paths}):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def bwrap_argv(
    bwrap: str,
    command: Sequence[str],
    *,
    instance_dir: Path,
    read_only: Iterable[str],
    tmp_size_bytes: int,
) -> list[str]:
    argv = [
        bwrap,
        "--unshare-all",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/tmp",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(tmp_size_bytes),
        "--tmpfs",
        "/tmp",
    ]
    # Merged-/usr systems have /bin, /lib... as symlinks: recreate the links
    # instead of binding the same directory twice.
    system = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            system.append(path)
    for path in _collapse([*system, *read_only]):
        argv += ["--ro-bind", path, path]
    argv += ["--bind", str(instance_dir), str(instance_dir), "--chdir", "/tmp", "--"]
    return argv + list(command)
