"""The reply stream of one execution: numbering, limits, one result last."""

from __future__ import annotations

import json
from typing import Any

import pytest

from veritech.secrets import Redactor
from veritech.server.relay import (
    OutputLimits,
    ReplyStream,
    ResultAlreadySent,
    result_from_frame,
)
from veritech.wire import ErrorKind, failure_body, success_body

TS = "2030-01-02T03:04:05.000Z"


def stream(
    max_lines: int = 100, max_line_bytes: int = 1000, max_payload: int = 1 << 20
) -> ReplyStream:
    return ReplyStream(
        "ex-1",
        "vt-1",
        limits=OutputLimits(max_lines, max_line_bytes),
        max_payload=max_payload,
    )


def frame(message: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "output",
        "stream": "stdout",
        "level": "info",
        "message": message,
        "timestamp": TS,
        **fields,
    }


def test_messages_are_numbered_from_zero_and_the_result_is_last() -> None:
    replies = stream()

    sent = [replies.accepted()]
    sent += replies.output(frame("one"))
    sent.append(replies.heartbeat())
    sent += replies.output(frame("two", stream="stderr", level="warn"))
    sent.append(replies.result(success_body(5, False), 3, 40))

    assert [m["seq"] for m in sent] == [0, 1, 2, 3, 4]
    assert [m["type"] for m in sent] == [
        "accepted",
        "output",
        "heartbeat",
        "output",
        "result",
    ]
    assert all(m["execution_id"] == "ex-1" for m in sent)
    assert sent[0]["instance"] == "vt-1"
    assert sent[3] == {
        "type": "output",
        "stream": "stderr",
        "level": "warn",
        "message": "two",
        "timestamp": TS,
        "execution_id": "ex-1",
        "seq": 3,
    }
    assert sent[4]["stats"] == {"queue_ms": 3, "run_ms": 40}
    assert replies.finished


def test_nothing_can_follow_the_result() -> None:
    replies = stream()
    replies.accepted()
    replies.result(success_body(None, True), 0, 0)

    with pytest.raises(ResultAlreadySent, match="execution ex-1 already has a result"):
        replies.output(frame("late"))
    with pytest.raises(ResultAlreadySent):
        replies.heartbeat()
    with pytest.raises(ResultAlreadySent):
        replies.result(success_body(1, False), 0, 0)


def test_bad_stream_level_and_timestamp_are_replaced() -> None:
    replies = stream()

    [message] = replies.output(
        {"message": 12, "stream": "tty", "level": "fatal", "timestamp": 5}
    )

    assert (message["stream"], message["level"], message["message"]) == (
        "stdout",
        "info",
        "12",
    )
    assert message["timestamp"].endswith("Z")


def test_too_many_lines_end_with_a_notice_and_limit_exceeded() -> None:
    replies = stream(max_lines=3)
    replies.accepted()

    sent = [m for i in range(3) for m in replies.output(frame(f"line {i}"))]
    assert replies.limit_exceeded is None
    over = replies.output(frame("line 3"))

    assert [m["message"] for m in sent] == ["line 0", "line 1", "line 2"]
    assert len(over) == 1
    assert (over[0]["stream"], over[0]["level"]) == ("stderr", "error")
    assert over[0]["message"] == (
        "[veritech] output cut: the function wrote more than 3 output lines"
    )
    assert over[0]["seq"] == 4
    assert replies.limit_exceeded == "the function wrote more than 3 output lines"
    assert replies.output(frame("line 4")) == []
    assert replies.limit_result() == failure_body(
        ErrorKind.OUTPUT_LIMIT_EXCEEDED,
        "the function wrote more than 3 output lines; the execution was stopped",
    )
    result = replies.result(replies.limit_result(), 0, 1)
    assert result["seq"] == 5


def test_a_line_too_long_is_cut_and_followed_by_a_notice() -> None:
    replies = stream(max_line_bytes=10)

    sent = replies.output(frame("0123456789abcdef"))

    assert [m["message"] for m in sent] == [
        "0123456789",
        "[veritech] output cut: the function wrote an output line longer than 10 bytes",
    ]
    assert [m["seq"] for m in sent] == [0, 1]
    assert replies.limit_exceeded == (
        "the function wrote an output line longer than 10 bytes"
    )


def test_a_line_is_cut_on_a_character_boundary() -> None:
    replies = stream(max_line_bytes=5)

    sent = replies.output(frame("ééé"))  # 6 bytes of UTF-8

    assert sent[0]["message"] == "éé"


def test_a_line_of_exactly_the_limit_passes() -> None:
    replies = stream(max_line_bytes=10)

    sent = replies.output(frame("0123456789"))

    assert [m["message"] for m in sent] == ["0123456789"]
    assert replies.limit_exceeded is None


def test_a_result_over_max_payload_becomes_result_too_large() -> None:
    replies = stream(max_payload=2000)
    replies.accepted()

    result = replies.result(success_body("x" * 5000, False), 1, 2)

    assert result["status"] == "failure"
    assert result["error"]["kind"] == "result_too_large"
    assert result["error"]["message"].startswith("the result is ")
    assert result["error"]["message"].endswith(
        "bytes, more than the NATS max_payload of 2000 bytes"
    )
    assert (result["seq"], result["execution_id"]) == (1, "ex-1")
    assert result["stats"] == {"queue_ms": 1, "run_ms": 2}
    assert len(json.dumps(result)) < 2000
    assert replies.finished


def test_a_result_that_fits_max_payload_is_kept() -> None:
    replies = stream(max_payload=8000)

    result = replies.result(success_body("x" * 5000, False), 0, 0)

    assert result["data"] == "x" * 5000


def test_secrets_are_redacted_from_output_and_result() -> None:
    replies = stream()
    replies.redact(Redactor(["hunter2"]))

    [line] = replies.output(frame("password is hunter2"))
    result = replies.result(success_body({"pw": "hunter2"}, False), 0, 0)

    assert line["message"] == "password is [redacted]"
    assert result["data"] == {"pw": "[redacted]"}


def test_result_frame_success() -> None:
    assert result_from_frame(
        {"type": "result", "status": "success", "data": [1], "unset": False}
    ) == success_body([1], False)
    assert result_from_frame(
        {"type": "result", "status": "success", "data": None, "unset": True}
    ) == success_body(None, True)


def test_result_frame_failure_keeps_kind_message_and_name() -> None:
    body = result_from_frame(
        {
            "status": "failure",
            "error": {"kind": "timeout", "message": "too slow", "name": "X"},
        }
    )

    assert body == failure_body(ErrorKind.TIMEOUT, "too slow", "X")


@pytest.mark.parametrize(
    ("frame_", "expected"),
    [
        ({"status": "success", "data": 1, "unset": "yes"}, success_body(1, False)),
        ({"status": "success"}, success_body(None, False)),
        (
            {"status": "failure", "error": {"kind": "bogus", "message": "m"}},
            failure_body(ErrorKind.INTERNAL, "m"),
        ),
        (
            {"status": "failure", "error": {"kind": "killed", "name": 5}},
            failure_body(ErrorKind.KILLED, ""),
        ),
        (
            {"status": "failure", "error": "boom"},
            failure_body(ErrorKind.INTERNAL, "cyclone sent a malformed result frame"),
        ),
        (
            {"status": "failure"},
            failure_body(ErrorKind.INTERNAL, "cyclone sent a malformed result frame"),
        ),
        (
            {"status": "maybe"},
            failure_body(ErrorKind.INTERNAL, "cyclone sent a malformed result frame"),
        ),
        ({}, failure_body(ErrorKind.INTERNAL, "cyclone sent a malformed result frame")),
    ],
    ids=[
        "unset-not-bool",
        "no-data",
        "unknown-kind",
        "name-not-string",
        "error-not-object",
        "no-error",
        "bad-status",
        "empty",
    ],
)
def test_malformed_result_frames(
    frame_: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert result_from_frame(frame_) == expected
