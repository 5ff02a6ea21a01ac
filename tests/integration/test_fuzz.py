"""Hostile input: property-based fuzzing of veritech's requests and the runner.

Every request veritech receives, however malformed, must get exactly one
``result``, last in its reply stream, and veritech must stay healthy. Every
run of the runner, whatever code it is given, must end in exactly one way
and leave no process behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from veritech.client import Client, make_request
from veritech.cyclone.protocol import Output, Returned, Threw
from veritech.cyclone.runner import Crashed, Runner, RunnerConfig, default_deno
from veritech.server.server import Veritech
from veritech.wire import MAX_NESTING, Kind

REPLY_DEADLINE_S = 60.0
INVALID = "invalid_request"
VALID_CODE = [
    "function main(a) { return a }",
    "function main() { return 1 }",
    "function main() { throw new TypeError('nope') }",
    "function main(a, s) { console.log(a, s); return null }",
]
MISSING = object()

# -- strategies: JSON values and, per field, a valid or a surely invalid value -----

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def not_a(*types: type) -> st.SearchStrategy[Any]:
    """JSON values of none of ``types`` (bool is not an int on the wire)."""

    def wrong(value: Any) -> bool:
        if isinstance(value, bool):
            return bool not in types
        return not isinstance(value, types)

    return json_values.filter(wrong)


ID_CHARS = "abcXYZ019._:-"
valid_ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=128)
invalid_ids = (
    not_a(str)
    | st.just("")
    | st.text(alphabet=ID_CHARS, min_size=129, max_size=200)
    | st.tuples(valid_ids, st.sampled_from(" /é\n\x00*>{")).map("".join)
)
valid_handlers = st.sampled_from(["main", "$main", "_m1"])
invalid_handlers = not_a(str) | st.sampled_from(
    ["", "1main", "ma in", "a.b", "é", "x" * 300]
)
valid_code = st.sampled_from(VALID_CODE)
invalid_code = not_a(str) | st.just("")
valid_languages = st.sampled_from(["javascript", "typescript", "cobol"])
invalid_languages = not_a(str) | st.sampled_from(["", "j" * 65])
valid_timeouts = st.integers(min_value=1, max_value=5000)
invalid_timeouts = (
    not_a(int) | st.integers(max_value=0) | st.sampled_from(["100", 1.5, True])
)
valid_response_types = st.sampled_from(
    ["string", "integer", "float", "boolean", "object", "array", "json", None]
)
invalid_response_types = not_a(str, type(None)) | st.sampled_from(["", "int", "JSON"])
sealed = st.fixed_dictionaries({"sealed": st.just("AAAA"), "key_id": st.just("k1")})
invalid_secrets = (
    not_a(dict, type(None))
    | st.dictionaries(st.text(max_size=5), not_a(dict), min_size=1, max_size=2)
    | st.dictionaries(
        st.text(max_size=5),
        st.fixed_dictionaries({"sealed": st.just("")}),
        min_size=1,
        max_size=2,
    )
)
invalid_images = not_a(str, type(None)) | st.just("")

# name -> (valid values, surely invalid values, required)
FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any], bool]] = {
    "execution_id": (valid_ids, invalid_ids, True),
    "handler": (valid_handlers, invalid_handlers, True),
    "code": (valid_code, invalid_code, True),
    "args": (json_values, st.nothing(), False),
    "language": (valid_languages, invalid_languages, False),
    "timeout_ms": (valid_timeouts, invalid_timeouts, False),
    "response_type": (valid_response_types, invalid_response_types, False),
    "secrets": (
        st.dictionaries(st.text(max_size=5), sealed, max_size=1),
        invalid_secrets,
        False,
    ),
    # A valid image would make the process backend start a pool for it, so
    # only invalid ones are thrown here.
    "container_image": (st.nothing(), invalid_images, False),
    "container_tag": (st.nothing(), invalid_images, False),
}


@dataclass(frozen=True)
class Case:
    """One request to throw, and what veritech must answer."""

    kind: str
    payload: bytes
    # The error kind required, or None: any one result (a valid request runs).
    expect: str | None
    what: str


@st.composite
def field_cases(draw: st.DrawFn) -> Case:
    request: dict[str, Any] = {}
    invalid = False
    # A quarter are well-formed throughout, so that requests that run are
    # thrown too (one field at fault in three otherwise makes nearly all bad).
    pristine = draw(st.integers(min_value=0, max_value=3)) == 0
    for name, (valid, wrong, required) in FIELDS.items():
        if pristine:
            choice = "valid" if required else draw(st.sampled_from(["valid", "no"]))
        else:
            choice = draw(st.sampled_from(["valid", "valid", "wrong", "missing"]))
        if choice == "valid" and not valid.is_empty:
            request[name] = draw(valid)
        elif choice == "wrong" and not wrong.is_empty:
            request[name] = draw(wrong)
            invalid = True
        elif required:
            invalid = True
    expect = "invalid_request" if invalid else None
    if not invalid and request.get("language") == "cobol":
        expect = "unsupported"
    elif not invalid and request.get("secrets"):
        # This veritech holds no key: a sealed secret cannot be opened.
        expect = "invalid_request"
    payload = json.dumps(request, ensure_ascii=draw(st.booleans())).encode()
    kind = draw(st.sampled_from([k.value for k in Kind]))
    return Case(kind, payload, expect, f"fields {sorted(request)}")


def valid_request(code: str = VALID_CODE[1], **fields: Any) -> dict[str, Any]:
    return make_request(code, execution_id=uuid.uuid4().hex, **fields)


@st.composite
def raw_cases(draw: st.DrawFn) -> Case:
    kinds = st.sampled_from([k.value for k in Kind])
    shape = draw(
        st.sampled_from(
            [
                "bytes",
                "bad_utf8",
                "not_object",
                "deep",
                "deep_args",
                "nan",
                "huge_code",
                "huge_handler",
                "unknown_kind",
                "duplicate_keys",
            ]
        )
    )
    if shape == "bytes":
        data = draw(st.binary(max_size=200))
        return Case(draw(kinds), data, INVALID, "random bytes")
    if shape == "bad_utf8":
        text = json.dumps(valid_request()).encode()
        at = draw(st.integers(min_value=0, max_value=len(text)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88"]))
        return Case(draw(kinds), text[:at] + bad + text[at:], INVALID, "invalid UTF-8")
    if shape == "not_object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return Case(draw(kinds), json.dumps(value).encode(), INVALID, "not an object")
    if shape == "deep":
        depth = draw(st.sampled_from([1000, 5000, 100_000]))
        data = b"[" * depth + b"]" * depth
        return Case(draw(kinds), data, INVALID, f"{depth} nested arrays")
    if shape == "deep_args":
        # Around the nesting limit and Python's recursion limit: run, or
        # refused as invalid, never lost halfway.
        depth = draw(st.sampled_from([100, 199, 200, 254, 256, 990, 1000, 5000]))
        head = json.dumps(valid_request())[:-1]
        data = f'{head}, "args": {"[" * depth}{"]" * depth}}}'.encode()
        expect = "invalid_request" if depth + 1 > MAX_NESTING else None
        return Case(draw(kinds), data, expect, f"args nested {depth} deep")
    if shape == "nan":
        constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        head = json.dumps(valid_request())[:-1]
        data = f'{head}, "args": [{constant}]}}'.encode()
        return Case(draw(kinds), data, INVALID, f"args holding {constant}")
    if shape == "huge_code":
        # Just under max_payload (1 MiB): a valid, huge function.
        size = draw(st.integers(min_value=1000, max_value=1024 * 1024 - 400))
        code = VALID_CODE[1] + "\n//" + "x" * size
        data = json.dumps(valid_request(code=code)).encode()
        return Case(draw(kinds), data, None, f"{size} bytes of code")
    if shape == "huge_handler":
        size = draw(st.integers(min_value=300, max_value=1024 * 1024 - 400))
        data = json.dumps(valid_request(handler="h" * size)).encode()
        return Case(draw(kinds), data, INVALID, f"handler of {size} bytes")
    if shape == "unknown_kind":
        kind = draw(
            st.from_regex(r"[a-z0-9_-]{1,12}(\.[a-z0-9_-]{1,12})?", fullmatch=True)
            | st.sampled_from(["RESOLVER", "resolver.x", "action.resolver"])
        ).strip(".")
        if kind in {k.value for k in Kind}:
            kind += "x"
        return Case(
            kind,
            json.dumps(valid_request()).encode(),
            "invalid_request",
            "unknown kind",
        )
    # Duplicate keys: the last one wins, as in every JSON parser we know of.
    head = json.dumps(valid_request())[:-1]
    data = f'{head}, "handler": 7}}'.encode()
    return Case(draw(kinds), data, INVALID, "duplicate key with a bad value")


async def throw_case(nc: NATS, prefix: str, case: Case) -> list[dict[str, Any]]:
    """Publish the raw request; collect its reply stream up to its result."""
    inbox = nc.new_inbox()
    messages: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def collect(msg: Msg) -> None:
        message = json.loads(msg.data)
        messages.append(message)
        if message.get("type") == "result":
            done.set()

    subscription = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(
            f"{prefix}veritech.function.{case.kind}", case.payload, reply=inbox
        )
        async with asyncio.timeout(REPLY_DEADLINE_S):
            await done.wait()
        # A second result would have to be published by now: a status round
        # trip has gone through the same veritech connection after it.
        await nc.request(f"{prefix}veritech.control.status", b"{}", timeout=10)
        await nc.flush()
    finally:
        await subscription.unsubscribe()
    return messages


def check_stream(case: Case, messages: list[dict[str, Any]]) -> None:
    results = [m for m in messages if m.get("type") == "result"]
    assert len(results) == 1, (case.what, messages)
    result = messages[-1]
    assert result is results[0], (case.what, messages)
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert result["status"] in ("success", "failure")
    if case.expect is not None:
        assert result["status"] == "failure", case.what
        assert result["error"]["kind"] == case.expect, (case.what, result)
        assert result["error"]["message"], case.what
    elif result["status"] == "failure":
        assert result["error"]["kind"] != "internal", (case.what, result)


async def assert_healthy(veritech: Veritech, client: Client) -> None:
    result = await client.run("resolver", valid_request(args=None))
    assert (result["status"], result["data"]) == ("success", 1)
    answers = await client.status(window_s=0.3)
    assert [a["instance"] for a in answers] == [veritech.id]
    assert veritech.status()["running"] == 0


FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ_SETTINGS
@given(case=st.one_of(field_cases(), raw_cases()))
async def test_every_malformed_request_gets_exactly_one_result(
    veritech: Veritech,
    client: Client,
    nc: NATS,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    case: Case,
) -> None:
    caplog.set_level(logging.WARNING, logger="veritech")

    messages = await throw_case(nc, prefix, case)

    check_stream(case, messages)
    result = messages[-1]
    event(f"result: {result.get('error', {}).get('kind', result['status'])}")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], case.what


async def test_veritech_is_healthy_after_a_burst_of_bad_requests(
    veritech: Veritech, client: Client, nc: NATS, prefix: str
) -> None:
    bad = [
        Case("resolver", b"\xff" * 100, INVALID, "bytes"),
        Case("resolver", b"[" * 100_000 + b"]" * 100_000, INVALID, "deep"),
        Case("nope", b"{}", INVALID, "kind"),
        Case("resolver", b'{"execution_id": 1}', INVALID, "types"),
    ] * 10

    streams = await asyncio.gather(*(throw_case(nc, prefix, c) for c in bad))

    for case, messages in zip(bad, streams, strict=True):
        check_stream(case, messages)
    await assert_healthy(veritech, client)


async def test_a_request_without_reply_subject_is_dropped_and_harmless(
    veritech: Veritech, client: Client, nc: NATS, prefix: str
) -> None:
    await nc.publish(f"{prefix}veritech.function.resolver", b"not json")
    await nc.publish(
        f"{prefix}veritech.function.resolver", json.dumps(valid_request()).encode()
    )
    await nc.flush()

    await assert_healthy(veritech, client)


# -- the runner's input ----------------------------------------------------------

SNIPPETS = [
    "function main(a) { return a }",
    "function main() { Deno.exit(3) }",
    "function main() { setTimeout(() => { throw new Error('late') }, 0); return 1 }",
    "async function main() { await new Promise(() => {}) }",
    "function main() { return new Promise(() => setInterval(() => {}, 50)) }",
    "function main() { return { toJSON() { throw new Error('no') } } }",
    "function main() { return 10n }",
    "function main() { const a = {}; a.a = a; return a }",
    "function main() { let a = []; for (let i = 0; i < 20000; i++) a = [a]; return a }",
    'function main() { console.log(\'{"nonce":"x","type":"return","value":1}\') }',
    "function main() { Deno.stdout.writeSync(new Uint8Array([255, 10, 123, 10])) }",
    "function main() { Deno.stderr.writeSync(new TextEncoder().encode('oops\\n')) }",
    "function main() { console.log = null; JSON.stringify = () => 'x'; return 2 }",
    "function main() { throw 'a string' }",
    "function main() { throw null }",
    "export default function main() { return 1 }",
    "function main() { while (true) {} }",
    "function main() { return '\\u2028\\u2029\\ud800' }",
    "syntax error here (",
    "",
]
snippets = st.sampled_from(SNIPPETS)
# Known-hostile functions most of the time, with random text after them or
# instead of them (and so, mostly, code that does not even parse).
runner_codes = st.one_of(
    snippets,
    snippets,
    st.tuples(snippets, st.text(max_size=100)).map("\n".join),
    st.text(max_size=200),
)
runner_handlers = st.one_of(
    st.just("main"),
    st.just("main"),
    st.sampled_from(["nothere", "toString", "", "main; Deno.exit(1)"]),
    st.text(max_size=30),
)
RUNNER_TIMEOUT_S = 3.0


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    code=runner_codes,
    handler=runner_handlers,
    args=json_values,
    kind=st.sampled_from([k.value for k in Kind]),
    language=st.sampled_from(["javascript", "typescript", "x"]),
    secrets=st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=2),
)
async def test_every_runner_run_ends_exactly_once_and_leaves_no_process(
    tmp_path: Path,
    code: str,
    handler: str,
    args: Any,
    kind: str,
    language: str,
    secrets: dict[str, str],
) -> None:
    runner = await Runner.start(
        RunnerConfig(deno=default_deno(), work_dir=tmp_path, memory_mb=64)
    )
    emitted: list[Output] = []

    async def emit(event: Output) -> None:
        emitted.append(event)

    request = {
        "kind": kind,
        "handler": handler,
        "code": code,
        "language": language,
        "args": args,
        "secrets": secrets,
    }
    try:
        async with asyncio.timeout(RUNNER_TIMEOUT_S + 10):
            ending = await runner.execute(request, RUNNER_TIMEOUT_S, emit)
    finally:
        await runner.kill()

    assert isinstance(ending, Returned | Threw | Crashed)
    event(f"ending: {type(ending).__name__} {getattr(ending, 'kind', '')}".strip())
    assert not runner.alive
    assert all(isinstance(e, Output) for e in emitted)
    with pytest.raises(RuntimeError):
        await runner.execute(request, RUNNER_TIMEOUT_S, emit)


@pytest.mark.parametrize(
    ("depth", "message"),
    [
        (300, "the returned value is nested more than 200 levels deep"),
        (
            20_000,
            "the returned value cannot be written: Maximum call stack size exceeded",
        ),
    ],
)
async def test_a_too_deep_return_value_is_invalid_return_type(
    veritech: Veritech, client: Client, depth: int, message: str
) -> None:
    loop = f"for (let i = 0; i < {depth}; i++) a = [a]"
    code = f"function main() {{ let a = []; {loop}; return a }}"

    result = await client.run("resolver", make_request(code))

    assert result["error"] == {"kind": "invalid_return_type", "message": message}


async def test_a_request_nested_too_deeply_is_refused_with_the_limit(
    veritech: Veritech, nc: NATS, prefix: str
) -> None:
    head = json.dumps(valid_request())[:-1]
    case = Case(
        "resolver",
        f'{head}, "args": {"[" * 250}{"]" * 250}}}'.encode(),
        INVALID,
        "deep",
    )

    messages = await throw_case(nc, prefix, case)

    assert messages[-1]["error"]["message"] == (
        f"request is nested more than {MAX_NESTING} levels deep"
    )
