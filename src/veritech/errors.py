"""The exception tree of the veritech package.

VeritechError
├── InvalidRequest        a request broke the wire rules (carries the reason)
├── ClientError           raised by the client library
│   ├── NoResponders      no veritech listens on the subject
│   ├── ExecutionLost     heartbeats stopped before a result arrived
│   ├── ClientTimeout     the client's own deadline passed
│   └── RequestTooLarge   the request does not fit NATS max_payload
├── SecretError           a sealed secret could not be opened
├── BackendError          a backend could not provide an instance
│   └── ImageUnavailable  the requested image cannot be had
├── NatsServerError       the bundled nats-server did not start
├── NatsUnavailable       veritech could not connect to NATS at startup
└── ImageBuildError       building the cyclone image failed (image.py)
"""

from __future__ import annotations


class VeritechError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidRequest(VeritechError):
    def __init__(self, message: str, execution_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.execution_id = execution_id


class ClientError(VeritechError):
    def __init__(self, message: str, execution_id: str | None = None) -> None:
        super().__init__(message)
        self.execution_id = execution_id


class NoResponders(ClientError):
    pass


class ExecutionLost(ClientError):
    pass


class ClientTimeout(ClientError):
    pass


class RequestTooLarge(ClientError):
    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class SecretError(VeritechError):
    pass


class BackendError(VeritechError):
    pass


class ImageUnavailable(BackendError):
    def __init__(self, image: str, reason: str) -> None:
        super().__init__(f"image {image} is unavailable: {reason}")
        self.image = image
        self.reason = reason


class NatsServerError(VeritechError):
    pass


class NatsUnavailable(VeritechError):
    def __init__(self, url: str, timeout_s: float, reason: str) -> None:
        super().__init__(
            f"cannot connect to NATS at {url} within {timeout_s:g}s: {reason}"
        )
        self.url = url
