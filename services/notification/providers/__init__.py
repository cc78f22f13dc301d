"""Adapters that hand a notification to an outside provider in that provider's own protocol.

Each adapter answers with a ``SendResult``: accepted, refused for good, or worth retrying (with
the provider's Retry-After when it gave one). Retrying, backoff and bookkeeping are not theirs:
``delivery.py`` does that once for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SendResult:
    """What a provider made of one send."""

    ok: bool
    #: For a failure: whether trying again later may succeed (network, 429, 5xx).
    retryable: bool = False
    #: The provider's reason for a failure, shown in Delivery.error_message.
    error: str = ""
    #: Seconds the provider asked us to wait (Retry-After), if it said.
    retry_after: float | None = None
    #: The push token is dead (uninstalled app, rotated token): forget the device.
    drop_device: bool = False

    @classmethod
    def accepted(cls) -> SendResult:
        """The provider took the message."""
        return cls(ok=True)

    @classmethod
    def retry(cls, error: str, retry_after: float | None = None) -> SendResult:
        """A failure that may pass later."""
        return cls(ok=False, retryable=True, error=error, retry_after=retry_after)

    @classmethod
    def refused(cls, error: str, *, drop_device: bool = False) -> SendResult:
        """A failure that retrying will not fix."""
        return cls(ok=False, error=error, drop_device=drop_device)


def retry_after_seconds(value: str | None) -> float | None:
    """The delay of a Retry-After header given in seconds (HTTP dates are rare from these APIs)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def classify_http(status: int, error: str, retry_after: str | None = None) -> SendResult:
    """The usual reading of an HTTP status: 2xx accepted, 408/429/5xx retry, other 4xx refused."""
    if 200 <= status < 300:
        return SendResult.accepted()
    if status in (408, 429) or status >= 500:
        return SendResult.retry(f"HTTP {status}: {error}", retry_after_seconds(retry_after))
    return SendResult.refused(f"HTTP {status}: {error}")
