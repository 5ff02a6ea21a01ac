"""The command line as a user runs it: real subprocesses, exit codes, output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IMAGE_ARGS = '{"registry":"ghcr.io","repository":"acme/api","tag":"1.4.2"}'


def cli(*argv: str, program: str = "veritech") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VERITECH_NATS_URL"}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [str(BIN / program), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert "Traceback" not in done.stdout, done.stdout


def test_run_prints_output_line_and_result() -> None:
    done = cli("run", "examples/image_reference.js", "--args", IMAGE_ARGS)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "stdout info  image reference: ghcr.io/acme/api:1.4.2"
    assert lines[1].startswith("success (queue ")
    assert lines[2] == '"ghcr.io/acme/api:1.4.2"'
    assert_no_traceback(done)


def test_run_json_prints_one_json_message_per_line() -> None:
    done = cli(
        "run",
        "examples/image_reference.js",
        "--json",
        "--args",
        "@examples/args/image.json",
    )

    assert done.returncode == 0, done.stderr
    messages = [json.loads(line) for line in done.stdout.splitlines()]
    assert [m["type"] for m in messages] == ["accepted", "output", "result"]
    assert [m["seq"] for m in messages] == [0, 1, 2]
    assert len({m["execution_id"] for m in messages}) == 1
    assert messages[1]["message"] == "image reference: ghcr.io/acme/api:1.4.2"
    assert (messages[2]["status"], messages[2]["data"]) == (
        "success",
        "ghcr.io/acme/api:1.4.2",
    )


def test_run_typescript_file_by_its_extension() -> None:
    done = cli(
        "run",
        "examples/tag_map.ts",
        "--json",
        "--response-type",
        "object",
        "--args",
        '{"labels":["a=1"]}',
    )

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["data"] == {"a": "1"}


def test_run_of_a_failing_function_exits_1(tmp_path: Path) -> None:
    code = tmp_path / "fails.js"
    code.write_text("function main() { throw new RangeError('out of range') }\n")

    done = cli("run", str(code))

    assert done.returncode == 1
    first, second = done.stdout.splitlines()
    assert first.startswith("failure user_code_exception RangeError (queue ")
    assert second == "out of range"
    assert_no_traceback(done)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["run", "examples/image_reference.js", "--bogus"],
            "Error: No such option '--bogus'",
        ),
        (["run", "examples/missing.js"], "error: no such file: examples/missing.js"),
        (
            ["run", "examples/image_reference.js", "--args", "{bad"],
            "error: --args is not valid JSON: Expecting property name enclosed in "
            "double quotes (line 1, column 2)",
        ),
        (
            ["run", "examples/image_reference.js", "--args", "@missing.json"],
            "error: cannot read --args file missing.json: No such file or directory",
        ),
        (
            ["run", "examples/image_reference.js", "--kind", "bogus"],
            "Error: Invalid value for '--kind': 'bogus' is not one of 'resolver', "
            "'qualification', 'action', 'validation'.",
        ),
    ],
    ids=["unknown-option", "missing-file", "bad-json", "missing-args-file", "bad-kind"],
)
def test_usage_errors_exit_2_with_a_clear_message(
    argv: list[str], message: str
) -> None:
    done = cli(*argv)

    assert done.returncode == 2
    assert message in done.stderr, done.stderr
    assert done.stdout == ""
    assert_no_traceback(done)


def test_run_without_a_reachable_nats_fails_with_one_line() -> None:
    done = cli("run", "examples/image_reference.js", "--nats-url", "nats://127.0.0.1:1")

    assert done.returncode not in (0, 2)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot connect to NATS at nats://127.0.0.1:1"), (
        lines[0]
    )
    assert_no_traceback(done)


@pytest.mark.parametrize(
    ("program", "argv", "usage"),
    [
        ("veritech", ["--help"], "Usage: veritech [OPTIONS] COMMAND [ARGS]..."),
        ("veritech", ["run", "--help"], "Usage: veritech run [OPTIONS] FILE"),
        ("cyclone", ["serve", "--help"], "Usage: cyclone serve [OPTIONS]"),
    ],
)
def test_help_exits_0(program: str, argv: list[str], usage: str) -> None:
    done = cli(*argv, program=program)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage), done.stdout[:200]
