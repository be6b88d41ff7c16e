"""When to retry a call and how long to wait: exponential backoff with jitter, ``Retry-After`` honoured.

Both POST endpoints are pure functions of their input, so every call may be repeated safely. Retried:
429 (``overloaded``), 502, 503 (``not_ready``, ``draining``, a load balancer without a live replica)
and failed connections (refused, reset, closed before the answer). Not retried: read timeouts (the
service may still be working on the request; a retry would double the load) and every other status.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

RETRY_STATUSES = frozenset({429, 502, 503})

#: Transport errors after which the request certainly or probably did not run to its end.
RETRY_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    httpx.PoolTimeout,
)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date); ``None`` if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` repeats at most (``retries + 1`` attempts in all).

    The wait before repeat ``n`` (0-based) is the server's ``Retry-After`` when it sent one, plus up to
    10 % jitter so that clients refused together do not return together; otherwise ``backoff · 2ⁿ``
    capped at ``max_backoff``, with "equal jitter" (uniformly between half and all of it). A
    ``Retry-After`` over ``max_retry_after`` is not waited for: the error is raised at once.
    """

    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 10.0
    max_retry_after: float = 60.0
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must be ≥ 0")

    def delay(self, repeat: int, retry_after: float | None) -> float | None:
        """Seconds to wait before repeat ``repeat`` (0-based), or ``None``: do not repeat."""
        if repeat >= self.retries:
            return None
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            return retry_after * (1 + 0.1 * float(self.random()))
        base = min(self.max_backoff, self.backoff * 2**repeat)
        return float(base * (0.5 + 0.5 * self.random()))

    def after_response(self, repeat: int, response: httpx.Response) -> float | None:
        """The wait before repeating a call that got ``response``, or ``None`` (do not repeat)."""
        if response.status_code not in RETRY_STATUSES:
            return None
        return self.delay(repeat, parse_retry_after(response.headers.get("retry-after")))

    def after_error(self, repeat: int, exc: httpx.TransportError) -> float | None:
        """The wait before repeating a call that failed with ``exc``, or ``None`` (do not repeat)."""
        if not isinstance(exc, RETRY_ERRORS):
            return None
        return self.delay(repeat, None)
