"""Pure ASGI middleware: the request body limit (enforced while streaming) and request metrics."""

from __future__ import annotations

import time
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import ApiError, error_response
from app.telemetry import Telemetry


class BodyLimitMiddleware:
    """413 ``payload_too_large`` for bodies over ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before anything is read; otherwise the
    bytes are counted as they arrive and reading stops with the error as soon as the limit is passed
    (chunked uploads never get buffered beyond it).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(
                "payload_too_large",
                f"the request body is {int(declared)} bytes, over the limit of {self.max_bytes}",
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(
                        "payload_too_large",
                        f"the request body exceeds the limit of {self.max_bytes} bytes",
                    )
            return message

        await self.app(scope, limited_receive, send)


class MetricsMiddleware:
    """Counts every HTTP request by endpoint (route template) and status, and times it."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry, endpoints: Collection[str]) -> None:
        self.app = app
        self.telemetry = telemetry
        self.endpoints = endpoints

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
            await self.app(scope, receive, observing_send)
        finally:
            self.telemetry.request_done(
                self._endpoint(scope), status, time.perf_counter() - started
            )

    def _endpoint(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        return str(scope["path"]) if scope["path"] in self.endpoints else "other"
