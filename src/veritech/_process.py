"""Helpers for child processes that must not outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child before exec: be SIGKILLed when the parent dies, however it dies.

    This is what keeps a bundled nats-server or a runner from living on as an
    orphan after a SIGKILL of veritech or cyclone.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
