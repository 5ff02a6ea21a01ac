"""The reply stream of one execution (pure; no I/O).

It numbers messages, enforces the output limits, redacts secrets, turns
cyclone's frames into protocol messages, and guarantees that exactly one
``result`` is produced and that it is last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from veritech.secrets import Redactor
from veritech.wire import (
    ErrorKind,
    MessageType,
    failure_body,
    now_rfc3339,
    output_body,
    success_body,
)

_STREAMS = ("stdout", "stderr")
_LEVELS = ("debug", "info", "warn", "error")
# Room for the envelope (type, ids, seq, stats) around a result's data.
ENVELOPE_BYTES = 1024


@dataclass(frozen=True, slots=True)
class OutputLimits:
    max_lines: int = 10_000
    max_line_bytes: int = 64 * 1024


class ResultAlreadySent(RuntimeError):
    pass


class ReplyStream:
    def __init__(
        self,
        execution_id: str,
        instance: str,
        *,
        limits: OutputLimits,
        max_payload: int,
        redactor: Redactor | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.instance = instance
        self._limits = limits
        self._max_payload = max_payload
        self._redactor = redactor or Redactor(())
        self._seq = 0
        self._lines = 0
        self.limit_exceeded: str | None = None
        self.finished = False

    def redact(self, redactor: Redactor) -> None:
        """Redact these secret values from every later message."""
        self._redactor = redactor

    def _stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.finished:
            raise ResultAlreadySent(
                f"execution {self.execution_id} already has a result"
            )
        message = {**body, "execution_id": self.execution_id, "seq": self._seq}
        self._seq += 1
        return message

    def accepted(self) -> dict[str, Any]:
        return self._stamp(
            {"type": MessageType.ACCEPTED.value, "instance": self.instance}
        )

    def heartbeat(self) -> dict[str, Any]:
        return self._stamp({"type": MessageType.HEARTBEAT.value})

    def output(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        """Messages to publish for one output frame from cyclone.

        Past a limit the output is cut, one last line says which limit, and
        ``limit_exceeded`` is set: the caller must stop the execution and end
        it with ``limit_result()``.
        """
        if self.limit_exceeded is not None:
            return []
        stream = frame.get("stream")
        level = frame.get("level")
        message = self._redactor.text(str(frame.get("message", "")))
        timestamp = frame.get("timestamp")
        body = output_body(
            stream if stream in _STREAMS else "stdout",
            level if level in _LEVELS else "info",
            message,
            timestamp if isinstance(timestamp, str) else now_rfc3339(),
        )
        if self._lines >= self._limits.max_lines:
            return [self._cut(f"more than {self._limits.max_lines} output lines")]
        self._lines += 1
        # A line must also fit a NATS message once JSON-escaped (a control
        # character takes six bytes there), or its publish would fail.
        max_bytes = min(self._limits.max_line_bytes, self._max_payload - ENVELOPE_BYTES)
        budget = self._max_payload - ENVELOPE_BYTES
        if len(message.encode("utf-8")) > max_bytes or _wire_size(message) > budget:
            body["message"] = _shorten(message, max_bytes, budget)
            limit = f"an output line longer than {max_bytes} bytes"
            return [self._stamp(body), self._cut(limit)]
        return [self._stamp(body)]

    def _cut(self, what: str) -> dict[str, Any]:
        self.limit_exceeded = f"the function wrote {what}"
        notice = output_body(
            "stderr",
            "error",
            f"[veritech] output cut: {self.limit_exceeded}",
            now_rfc3339(),
        )
        return self._stamp(notice)

    def limit_result(self) -> dict[str, Any]:
        assert self.limit_exceeded is not None
        return failure_body(
            ErrorKind.OUTPUT_LIMIT_EXCEEDED,
            f"{self.limit_exceeded}; the execution was stopped",
        )

    def result(
        self, body: dict[str, Any], queue_ms: int, run_ms: int
    ) -> dict[str, Any]:
        """The one final message; a result too large for NATS becomes an error."""
        body = self._redactor.value(body)
        message = self._stamp(
            {**body, "stats": {"queue_ms": queue_ms, "run_ms": run_ms}}
        )
        size = len(json.dumps(message, ensure_ascii=False).encode("utf-8"))
        if size > self._max_payload:
            message = {
                **failure_body(
                    ErrorKind.RESULT_TOO_LARGE,
                    f"the result is {size} bytes, more than the NATS max_payload "
                    f"of {self._max_payload} bytes",
                ),
                "execution_id": self.execution_id,
                "seq": message["seq"],
                "stats": message["stats"],
            }
        self.finished = True
        return message


def _wire_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8"))


def _shorten(text: str, max_bytes: int, budget: int) -> str:
    """The longest prefix of ``text`` within ``max_bytes`` of UTF-8 whose
    JSON form fits ``budget`` bytes (approached by proportional cuts)."""
    cut = text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
    while (size := _wire_size(cut)) > budget:
        cut = cut[: min(len(cut) - 1, len(cut) * budget // size)]
    return cut


def result_from_frame(frame: dict[str, Any]) -> dict[str, Any]:
    """The result body carried by cyclone's ``result`` frame, checked.

    cyclone runs next to untrusted code, so its frame is validated rather
    than trusted: a frame that does not say success or failure properly is an
    internal error.
    """
    status = frame.get("status")
    if status == "success":
        unset = frame.get("unset")
        return success_body(
            frame.get("data"), unset if isinstance(unset, bool) else False
        )
    error = frame.get("error")
    if status == "failure" and isinstance(error, dict):
        try:
            kind = ErrorKind(str(error.get("kind")))
        except ValueError:
            kind = ErrorKind.INTERNAL
        name = error.get("name")
        return failure_body(
            kind, str(error.get("message", "")), name if isinstance(name, str) else None
        )
    return failure_body(ErrorKind.INTERNAL, "cyclone sent a malformed result frame")
