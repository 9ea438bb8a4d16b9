"""Short human reasons for failed requests to upstreams (logs, errors, the dashboard)."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectionRefusedError, TimeoutError as ConnectTimeout
from twisted.python.failure import Failure

from paddler.llamacpp.errors import ProbeError


def describe_failure(failure: Failure, timeout: float | None = None) -> str:
    """A short human reason for a failed request to an upstream."""
    if failure.check(DeferredTimeout, CancelledError, ConnectTimeout):
        return f"no answer within {timeout:g} s" if timeout else "timed out"
    if failure.check(ConnectionRefusedError):
        return "connection refused"
    if failure.check(ProbeError):
        return str(failure.value)
    name = type(failure.value).__name__
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return f"{name}: {reasons[0].getErrorMessage()}"
    return f"{name}: {failure.getErrorMessage()}"
