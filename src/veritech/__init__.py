"""Veritech runs untrusted user functions on demand.

A client sends a request over NATS; a veritech server takes it, hands it to a
pre-started, sandboxed cyclone instance, and relays every output line and the
final result back to the client's reply subject.
"""

__version__ = "0.1.0"
