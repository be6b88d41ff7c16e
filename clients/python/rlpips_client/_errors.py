"""The exceptions of the client: every failure is an :class:`RLPIPSError` carrying the service's error code."""

from __future__ import annotations

from typing import Any


class RLPIPSError(Exception):
    """A call failed. ``status`` is the HTTP status (``None`` when no response came), ``code`` the
    service's error code (``error.code`` of its JSON body, e.g. ``invalid_image``; ``http_<status>``
    for a body that is not the service's, e.g. a load balancer's page; ``connection_error`` when no
    response came), ``message`` its message, ``field`` the request field it names (if any),
    ``request_id`` the call's ``X-Request-ID`` and ``retry_after`` the ``Retry-After`` hint in seconds."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        request_id: str | None = None,
        *,
        field: str | None = None,
        retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status or '-'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.field = field
        self.retry_after = retry_after
        self.body = body


class ClientError(RLPIPSError):
    """4xx: the request itself is wrong (bad image, bad option, too large …); retrying will not help."""


class AuthenticationError(ClientError):
    """401 ``unauthorized``: no valid API key."""


class RateLimitedError(ClientError):
    """429 ``overloaded``: the service's queue was full on every attempt (see ``retry_after``)."""


class ServerError(RLPIPSError):
    """5xx: the service (or a load balancer in front of it) failed."""


class UnavailableError(ServerError):
    """503: ``not_ready`` or ``draining`` on every attempt."""


class ConnectionFailed(RLPIPSError):
    """No response: the connection failed on every attempt (``status`` is ``None``)."""


def error_class(status: int) -> type[RLPIPSError]:
    """The exception type for an HTTP error ``status``."""
    if status == 401:
        return AuthenticationError
    if status == 429:
        return RateLimitedError
    if status == 503:
        return UnavailableError
    if status >= 500:
        return ServerError
    return ClientError


class RequestTimeout(ConnectionFailed):
    """The answer did not come within the client's ``timeout`` (not retried: the service may still be
    working on it)."""
