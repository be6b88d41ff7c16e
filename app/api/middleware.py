"""Pure ASGI middleware: reading request bodies safely, answering early without resets, and metrics.

* :class:`RequestBodyMiddleware` enforces the body limit while streaming and read timeouts (between
  chunks and for the whole body): 413 ``payload_too_large`` or 408 ``request_timeout``.
* :class:`DrainMiddleware` makes early answers reach every client: an error decided before the body was
  read (401, 413, 415, 422, 503…) would otherwise reach a client that sends its whole body before
  reading (``Connection: close``: urllib, requests, nginx towards upstreams) as a connection reset,
  because the server closes a socket with unread data. The rest of the body is read and dropped first.
* :class:`CloseWhileDrainingMiddleware` answers ``Connection: close`` once the service is draining, so
  clients and load balancers open their next connection elsewhere instead of reusing this one.
* :class:`MetricsMiddleware` counts and times every request by endpoint and status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import ApiError, error_response
from app.telemetry import Telemetry


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _declared_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _has_body(scope: Scope) -> bool:
    if _header(scope, b"transfer-encoding") is not None:
        return True
    return (_declared_length(scope) or 0) > 0


class RequestBodyMiddleware:
    """413 for bodies over ``max_bytes``; 408 when the client stalls ``idle_s`` between chunks or takes
    over ``total_s`` for the whole body.

    A declared ``Content-Length`` over the limit is refused before anything is read; otherwise the bytes
    are counted as they arrive and reading stops with the error as soon as the limit is passed (chunked
    uploads never get buffered beyond it).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, idle_s: float, total_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self.total_s = total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = error_response(
                "payload_too_large",
                f"the request body is {declared} bytes, over the limit of {self.max_bytes}",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, self._guarded(receive), send)

    def _guarded(self, receive: Receive) -> Receive:
        received = 0
        started: float | None = None
        done = False

        async def guarded() -> Message:
            nonlocal received, started, done
            if done:  # the body is read: the next message is a disconnect, whenever it comes
                return await receive()
            now = time.monotonic()
            started = now if started is None else started
            wait = min(self.idle_s, started + self.total_s - now)
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    message = await receive()
            except TimeoutError:
                raise ApiError(
                    "request_timeout",
                    f"the request body did not arrive in time (at most {self.idle_s:g} s between "
                    f"chunks, {self.total_s:g} s in all)",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise ApiError(
                        "payload_too_large",
                        f"the request body exceeds the limit of {self.max_bytes} bytes",
                    )
            return message

        return guarded


class DrainMiddleware:
    """Before an answer to a request whose body was not read to its end, read and drop the rest (while
    the body stays within ``max_bytes`` in all, the body limit, and for at most ``timeout_s``), so the
    client sees the answer, not a reset (module docstring).

    Not for ``Expect: 100-continue`` requests whose body was never asked for (the client waits and
    sends nothing), nor after a 408 (the client is the slow party). When the rest cannot be read, the
    answer says ``Connection: close``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        asked = False  # the app asked for the body (so a 100-continue client sends it)
        finished = False  # the whole body (or the disconnect) has been received
        seen = 0  # body bytes received so far

        async def tracking_receive() -> Message:
            nonlocal asked, finished, seen
            asked = True
            message = await receive()
            seen += len(message.get("body", b""))
            finished = finished or message["type"] == "http.disconnect"
            finished = finished or not message.get("more_body", False)
            return message

        async def draining_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not finished:
                expect = _header(scope, b"expect") == b"100-continue"
                if not (expect and not asked) and message["status"] != 408:
                    drained = await self._drain(scope, receive, seen)
                    if not drained:
                        message = _closing(message)
                else:
                    message = _closing(message)
            await send(message)

        await self.app(scope, tracking_receive, draining_send)

    async def _drain(self, scope: Scope, receive: Receive, seen: int) -> bool:
        """Read and drop the rest of the body (``seen`` bytes were read); ``True`` when it all came."""
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            return False
        try:
            async with asyncio.timeout(self.timeout_s):
                while seen <= self.max_bytes:
                    message = await receive()
                    if message["type"] != "http.request":
                        return True
                    seen += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return True
        except TimeoutError:
            pass
        return False


def _closing(message: Message) -> Message:
    """The response start with ``Connection: close`` (the server then closes after the answer)."""
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
    return {**message, "headers": [*headers, (b"connection", b"close")]}


class CloseWhileDrainingMiddleware:
    """Every response started while ``draining()`` is true says ``Connection: close`` (the server then
    closes the connection after it): keep-alive connections, a load balancer's pooled ones included,
    leave a draining replica with their next request instead of meeting its closed listener."""

    def __init__(self, app: ASGIApp, draining: Callable[[], bool]) -> None:
        self.app = app
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.draining():
                message = _closing(message)
            await send(message)

        await self.app(scope, receive, closing_send)


class MetricsMiddleware:
    """Counts every HTTP request by endpoint (route template) and status, and times it; while it runs
    it is counted in ``rlpips_inflight_requests`` (by ``endpoint_of(path)``, known before routing).

    ``endpoint_of(path)`` names requests that no route handled (refused in middleware): their path when
    it is one of the app's, else ``other``.
    """

    def __init__(
        self, app: ASGIApp, telemetry: Telemetry, endpoint_of: Callable[[str], str]
    ) -> None:
        self.app = app
        self.telemetry = telemetry
        self.endpoint_of = endpoint_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            with self.telemetry.request_inflight(self.endpoint_of(str(scope["path"]))):
                await self.app(scope, receive, observing_send)
        finally:
            self.telemetry.request_done(
                self._endpoint(scope), status, time.perf_counter() - started
            )

    def _endpoint(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        return path if isinstance(path, str) else self.endpoint_of(str(scope["path"]))
