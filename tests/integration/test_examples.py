"""Every example in examples/ runs through the whole stack and gives its result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from veritech.client import Client, make_request
from veritech.server.server import Veritech

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_args(name: str) -> Any:
    return json.loads((EXAMPLES / "args" / name).read_text())


async def run_example(
    client: Client, file: str, kind: str, args: Any, **fields: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The output messages and the result of one example."""
    path = EXAMPLES / file
    language = "typescript" if path.suffix == ".ts" else "javascript"
    request = make_request(
        path.read_text(), args=args, language=language, timeout_ms=20_000, **fields
    )
    messages = [m async for m in client.execute(kind, request)]
    assert messages[0]["type"] == "accepted"
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    outputs = [m for m in messages if m["type"] == "output"]
    return outputs, messages[-1]


def lines(outputs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(m["stream"], m["level"], m["message"]) for m in outputs]


def assert_success(result: dict[str, Any], data: Any, unset: bool = False) -> None:
    assert result["type"] == "result"
    assert result["status"] == "success", result
    assert (result["data"], result["unset"]) == (data, unset)


def test_readme_names_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    sources = [p.name for p in EXAMPLES.iterdir() if p.suffix in (".js", ".ts")]
    assert sources
    for name in sources:
        assert f"veritech run examples/{name}" in readme, name
    for args_file in (EXAMPLES / "args").iterdir():
        assert f"@examples/args/{args_file.name}" in readme, args_file.name


async def test_image_reference_resolver(veritech: Veritech, client: Client) -> None:
    outputs, result = await run_example(
        client, "image_reference.js", "resolver", load_args("image.json")
    )

    assert lines(outputs) == [
        ("stdout", "info", "image reference: ghcr.io/acme/api:1.4.2")
    ]
    assert_success(result, "ghcr.io/acme/api:1.4.2")


async def test_image_reference_without_repository_is_unset(
    veritech: Veritech, client: Client
) -> None:
    outputs, result = await run_example(client, "image_reference.js", "resolver", {})

    assert lines(outputs) == [
        ("stderr", "warn", "no repository set; the image reference is unset")
    ]
    assert_success(result, None, unset=True)


async def test_tags_resolver_merges_a_tag_map(
    veritech: Veritech, client: Client
) -> None:
    outputs, result = await run_example(
        client,
        "tags.js",
        "resolver",
        load_args("tags.json"),
        response_type="object",
    )

    assert lines(outputs) == [
        ("stdout", "info", "5 tags: CostCenter, Environment, ManagedBy, Name, Owner")
    ]
    assert_success(
        result,
        {
            "CostCenter": "4711",
            "Environment": "production",
            "ManagedBy": "terraform",
            "Name": "api-server",
            "Owner": "platform-team",
        },
    )


async def test_typescript_tag_map_resolver(veritech: Veritech, client: Client) -> None:
    outputs, result = await run_example(
        client,
        "tag_map.ts",
        "resolver",
        load_args("labels.json"),
        response_type="object",
    )

    assert lines(outputs) == [
        ("stderr", "warn", 'skipped label without a key: "orphan"'),
        ("stdout", "info", "2 tags"),
    ]
    assert_success(result, {"app/team": "payments", "app/tier": "backend"})


async def test_port_qualification_explains_failures(
    veritech: Veritech, client: Client
) -> None:
    outputs, result = await run_example(
        client, "qualification_ports.js", "qualification", load_args("ports_bad.json")
    )

    assert lines(outputs) == [
        ("stderr", "warn", "tcp port 22 is open to the internet (0.0.0.0/0)"),
        ("stderr", "warn", "invalid port range 8080-8000"),
    ]
    assert_success(
        result,
        {
            "result": "failure",
            "message": "tcp port 22 is open to the internet (0.0.0.0/0); "
            "invalid port range 8080-8000",
        },
    )


async def test_port_qualification_passes_good_rules(
    veritech: Veritech, client: Client
) -> None:
    outputs, result = await run_example(
        client, "qualification_ports.js", "qualification", load_args("ports_good.json")
    )

    assert lines(outputs) == [("stdout", "info", "2 ingress rules checked")]
    assert_success(result, {"result": "success"})


async def test_port_qualification_without_rules_warns(
    veritech: Veritech, client: Client
) -> None:
    _, result = await run_example(
        client, "qualification_ports.js", "qualification", {"ingress": []}
    )

    assert_success(
        result,
        {"result": "warning", "message": "no ingress rules: nothing can reach it"},
    )


async def test_restart_action_reports_status_payload_and_resource(
    veritech: Veritech, client: Client
) -> None:
    outputs, result = await run_example(
        client, "action_restart.js", "action", load_args("restart.json")
    )

    assert lines(outputs) == [
        ("stdout", "info", "restarting api (state: degraded)"),
        ("stderr", "warn", "api was degraded before the restart"),
    ]
    assert_success(
        result,
        {
            "status": "warning",
            "payload": {"service": "api", "previous_state": "degraded"},
            "message": "api restarted; it was degraded",
            "resource_id": "i-0abc123",
        },
    )


async def test_restart_action_that_throws_is_status_error(
    veritech: Veritech, client: Client
) -> None:
    _, result = await run_example(client, "action_restart.js", "action", {})

    assert_success(result, {"status": "error", "message": "no service given"})


@pytest.mark.parametrize(
    ("value", "verdict"),
    [
        ("10.0.0.0/16", {"valid": True}),
        (
            "10.0.0.1/16",
            {"valid": False, "message": "10.0.0.1/16 has host bits set below /16"},
        ),
        (
            "300.0.0.0/8",
            {"valid": False, "message": "300.0.0.0/8 has an octet above 255"},
        ),
        (42, {"valid": False, "message": "expected a string, got number"}),
    ],
)
async def test_cidr_validation(
    veritech: Veritech, client: Client, value: Any, verdict: dict[str, Any]
) -> None:
    outputs, result = await run_example(
        client, "validation_cidr.js", "validation", value
    )

    assert outputs == []
    assert_success(result, verdict)


async def test_logging_on_every_level(veritech: Veritech, client: Client) -> None:
    outputs, result = await run_example(
        client, "logging_levels.js", "resolver", {"name": "db"}
    )

    assert lines(outputs) == [
        ("stdout", "debug", "debug: starting"),
        ("stdout", "info", 'info via log: {"name":"db"}'),
        ("stdout", "info", "info via info"),
        ("stderr", "warn", "warn: disk 91% full"),
        ("stderr", "error", "error: replica unreachable"),
        ("stdout", "info", "line one"),
        ("stdout", "info", "line two"),
    ]
    assert all(m["timestamp"].endswith("Z") for m in outputs)
    assert_success(result, "logged for db")
