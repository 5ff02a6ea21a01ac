"""The client library: send requests to veritech over NATS, read the replies."""

from veritech.client._client import Client, make_request, open_client
from veritech.client.resolvers import (
    JavaScriptBackend,
    LiteralBackend,
    ResolvedValue,
    ResolverError,
)

__all__ = [
    "Client",
    "JavaScriptBackend",
    "LiteralBackend",
    "ResolvedValue",
    "ResolverError",
    "make_request",
    "open_client",
]
