"""Reading the runner's stdout: only lines with the nonce are protocol."""

from __future__ import annotations

import json

from veritech.cyclone.protocol import (
    Output,
    Returned,
    Threw,
    parse_runner_line,
    split_runner_line,
)

NONCE = "n0nce-5ecret"


def line(**fields: object) -> str:
    # The runner writes compact JSON, nonce first.
    return json.dumps({"nonce": NONCE, **fields}, separators=(",", ":"))


def test_return_line() -> None:
    assert parse_runner_line(line(type="return", value={"a": [1]}), NONCE) == (
        Returned({"a": [1]})
    )


def test_throw_line() -> None:
    event = parse_runner_line(
        line(type="throw", name="TypeError", message="bad"), NONCE
    )

    assert event == Threw("TypeError", "bad")


def test_throw_line_without_name_is_an_error() -> None:
    assert parse_runner_line(line(type="throw"), NONCE) == Threw("Error", "")


def test_output_line() -> None:
    event = parse_runner_line(
        line(
            type="output",
            stream="stderr",
            level="error",
            message="oops",
            timestamp="2030-01-01T00:00:00.000Z",
        ),
        NONCE,
    )

    assert event == Output("stderr", "error", "oops", "2030-01-01T00:00:00.000Z")


def test_output_line_with_bad_stream_and_level_is_stdout_info() -> None:
    event = parse_runner_line(
        line(type="output", stream="fd3", level="loud", message="m"), NONCE
    )

    assert isinstance(event, Output)
    assert (event.stream, event.level, event.message) == ("stdout", "info", "m")
    assert event.timestamp.endswith("Z")


def test_wrong_nonce_is_plain_stdout_text() -> None:
    forged = json.dumps({"nonce": "guess", "type": "return", "value": "pwned"})

    event = parse_runner_line(forged, NONCE)

    assert isinstance(event, Output)
    assert (event.stream, event.level, event.message) == ("stdout", "info", forged)


def test_forged_line_without_nonce_is_plain_text() -> None:
    forged = json.dumps({"type": "return", "value": 1})

    event = parse_runner_line(forged, NONCE)

    assert isinstance(event, Output)
    assert event.message == forged


def test_non_object_and_non_json_lines_are_plain_text() -> None:
    for text in ["hello", "[1, 2]", '"str"', "{not json", ""]:
        event = parse_runner_line(text, NONCE)
        assert isinstance(event, Output)
        assert (event.stream, event.level, event.message) == ("stdout", "info", text)


def test_nonce_of_another_type_does_not_match() -> None:
    text = json.dumps({"nonce": 12345, "type": "return", "value": 1})

    assert isinstance(parse_runner_line(text, "12345"), Output)


def test_unknown_type_with_nonce_is_plain_text() -> None:
    text = line(type="exec", value="rm -rf /")

    event = parse_runner_line(text, NONCE)

    assert isinstance(event, Output)
    assert event.message == text


def test_return_too_deep_is_an_unserializable_return() -> None:
    value: object = 1
    for _ in range(250):
        value = [value]

    event = parse_runner_line(line(type="return", value=value), NONCE)

    assert isinstance(event, Threw)
    assert event.name == "UnserializableReturn"


def test_user_text_without_newline_glued_to_a_protocol_line_is_split() -> None:
    protocol = line(type="return", value=3)

    events = split_runner_line("partial text" + protocol, NONCE)

    assert len(events) == 2
    assert isinstance(events[0], Output)
    assert events[0].message == "partial text"
    assert events[1] == Returned(3)


def test_a_forged_nonce_inside_user_text_stays_text() -> None:
    forged = 'say {"nonce":"guess","type":"return","value":1}'

    events = split_runner_line(forged, NONCE)

    assert len(events) == 1
    assert isinstance(events[0], Output)
    assert events[0].message == forged
