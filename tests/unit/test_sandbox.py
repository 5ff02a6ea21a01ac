"""The bubblewrap command line of a process-backend instance."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from veritech.backends.sandbox import SANDBOX_UID, bwrap_argv, python_roots

COMMAND = ["/usr/bin/python3", "-m", "veritech.cyclone", "serve"]


def argv(instance_dir: Path, read_only: list[str]) -> list[str]:
    return bwrap_argv(
        "/usr/bin/bwrap",
        COMMAND,
        instance_dir=instance_dir,
        read_only=read_only,
        tmp_size_bytes=1234,
    )


def pairs(args: list[str], flag: str) -> list[tuple[str, str]]:
    """(source, destination) of every ``flag SRC DEST`` in ``args``."""
    return [
        (args[i + 1], args[i + 2]) for i, arg in enumerate(args[:-2]) if arg == flag
    ]


def test_isolation_flags(tmp_path: Path) -> None:
    args = argv(tmp_path, [])

    assert args[0] == "/usr/bin/bwrap"
    for flag in ("--unshare-all", "--die-with-parent", "--clearenv", "--new-session"):
        assert flag in args
    assert "--share-net" not in args
    uid = args.index("--uid")
    assert args[uid + 1] == str(SANDBOX_UID)
    size = args.index("--size")
    assert args[size + 1 : size + 4] == ["1234", "--tmpfs", "/tmp"]


def test_command_comes_last_after_the_separator(tmp_path: Path) -> None:
    args = argv(tmp_path, [])

    separator = args.index("--")
    assert args[separator + 1 :] == COMMAND


def test_environment_is_only_what_is_set(tmp_path: Path) -> None:
    args = argv(tmp_path, [])

    clear = args.index("--clearenv")
    set_env = [args[i + 1] for i, a in enumerate(args) if a == "--setenv"]
    assert set_env == ["PATH", "HOME", "LANG"]
    assert args.index("--setenv") > clear


def test_only_the_instance_dir_is_writable(tmp_path: Path) -> None:
    read_only = ["/opt/deno/bin", str(Path(sys.prefix))]

    args = argv(tmp_path, read_only)

    assert pairs(args, "--bind") == [(str(tmp_path), str(tmp_path))]
    binds = pairs(args, "--ro-bind")
    assert ("/opt/deno/bin", "/opt/deno/bin") in binds
    assert all(source == dest for source, dest in binds)
    assert str(tmp_path) not in {source for source, _ in binds}
    assert "--bind-try" not in args and "--dev-bind" not in args


def test_nested_read_only_paths_are_bound_once(tmp_path: Path) -> None:
    args = argv(tmp_path, ["/opt/a", "/opt/a/b", "/opt/ab"])

    sources = [source for source, _ in pairs(args, "--ro-bind")]
    assert "/opt/a" in sources and "/opt/ab" in sources
    assert "/opt/a/b" not in sources


@pytest.mark.parametrize("dangerous", ["/", tempfile.gettempdir(), str(Path.cwd())])
def test_python_roots_ignore_the_working_directory_and_tmp(
    monkeypatch: pytest.MonkeyPatch, dangerous: str
) -> None:
    # sys.path[0] is the script's directory or the working directory; bound
    # into the sandbox, / would expose the host and /tmp would hide its /tmp.
    monkeypatch.setattr(sys, "path", [dangerous, *sys.path])

    roots = python_roots()

    assert "/" not in roots
    assert tempfile.gettempdir() not in roots
    assert sys.prefix in roots


def test_python_roots_cover_the_veritech_package() -> None:
    import veritech

    package = Path(veritech.__file__).resolve()

    assert any(package.is_relative_to(root) for root in python_roots())
