"""Reading the runner's stdout (pure; docs/protocol.md, section 3).

Every line the runner itself writes is a JSON object carrying the nonce that
cyclone gave it with the request. Any other line is text that user code wrote
to stdout directly; it becomes an ordinary output line, never a protocol
message, whatever it looks like.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from veritech.wire import MAX_NESTING, nesting_depth, now_rfc3339


@dataclass(frozen=True, slots=True)
class Output:
    stream: str
    level: str
    message: str
    timestamp: str


@dataclass(frozen=True, slots=True)
class Returned:
    value: Any


@dataclass(frozen=True, slots=True)
class Threw:
    name: str
    message: str


RunnerEvent = Output | Returned | Threw

_STREAMS = ("stdout", "stderr")
_LEVELS = ("debug", "info", "warn", "error")


def parse_runner_line(line: str, nonce: str) -> RunnerEvent:
    """Turn one stdout line of the runner into an event."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        obj = None
    except RecursionError:
        # Only the runner can start a line with the nonce: this is its
        # result, too deep for Python to read.
        if line.startswith('{"nonce":' + json.dumps(nonce)):
            return _too_deep()
        obj = None
    if not isinstance(obj, dict) or obj.get("nonce") != nonce:
        return Output("stdout", "info", line, now_rfc3339())

    kind = obj.get("type")
    if kind == "return":
        if nesting_depth(obj.get("value")) > MAX_NESTING:
            return _too_deep()
        return Returned(obj.get("value"))
    if kind == "throw":
        return Threw(str(obj.get("name", "Error")), str(obj.get("message", "")))
    if kind == "output":
        stream = obj.get("stream")
        level = obj.get("level")
        return Output(
            stream if stream in _STREAMS else "stdout",
            level if level in _LEVELS else "info",
            str(obj.get("message", "")),
            str(obj.get("timestamp") or now_rfc3339()),
        )
    return Output("stdout", "info", line, now_rfc3339())


def split_runner_line(line: str, nonce: str) -> list[RunnerEvent]:
    """The events of one stdout line, which may start with user text.

    User code can write to stdout without a final newline; the runner's next
    line then continues that text. Only the runner knows the nonce, so its own
    object starts where ``{"nonce":"<nonce>"`` does: what comes before is
    output, and the protocol message after it is neither lost nor shown.
    """
    start = line.find('{"nonce":' + json.dumps(nonce))
    if start <= 0:
        return [parse_runner_line(line, nonce)]
    return [
        Output("stdout", "info", line[:start], now_rfc3339()),
        parse_runner_line(line[start:], nonce),
    ]


def _too_deep() -> Threw:
    # Deeper values could not be carried by every hop to the client.
    return Threw(
        "UnserializableReturn",
        f"the returned value is nested more than {MAX_NESTING} levels deep",
    )


def stderr_output(line: str) -> Output:
    """A line the runner process wrote on stderr (Deno's own complaints)."""
    return Output("stderr", "warn", line, now_rfc3339())


# V8's own words, then Rust's when an allocation outside V8 hits RLIMIT_DATA.
OOM_MARKERS = (
    "Reached heap limit",
    "JavaScript heap out of memory",
    "out of memory",
    "memory allocation of",
)


def looks_out_of_memory(stderr_tail: str) -> bool:
    return any(marker in stderr_tail for marker in OOM_MARKERS)
