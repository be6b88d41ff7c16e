"""The HTTP/1.1 connection handling under the app: uvicorn's httptools protocol with the guards it lacks.

* A connection that sends nothing is closed after the keep-alive timeout (uvicorn arms that timer only
  after a first response).
* A request's headers must arrive within ``header_timeout_s`` and fit in ``max_header_bytes``; otherwise
  408 ``request_timeout`` or 431 ``headers_too_large`` and the connection is closed (slow-header
  attacks hold nothing for long).
* Errors of the HTTP layer itself (a malformed request line, bad ``Content-Length``, a broken chunk
  size) get the JSON error body of the API instead of uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from app.api.errors import STATUS


def error_bytes(code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response with the API's JSON body that closes the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        STATUS_LINE[STATUS[code]],
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body


class GuardedProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` with the guards of the module docstring (set the class attributes
    through :func:`guarded_protocol`)."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0
    _in_headers = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers or self.cycle is None or self.cycle.response_complete:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._header_bytes > self.max_header_bytes:
            self._refuse(
                "headers_too_large",
                f"the request headers are over {self.max_header_bytes} bytes",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._stop_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self._header_bytes = 0  # what comes next belongs to the next request
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        self._stop_header_timer()
        if not self.transport.is_closing():
            self.transport.write(error_bytes("bad_request", f"invalid HTTP request: {msg}"))
            self.transport.close()

    def _headers_late(self) -> None:
        if self._in_headers:
            self._refuse(
                "request_timeout",
                f"the request headers did not arrive within {self.header_timeout_s:g} s",
            )

    def _refuse(self, code: str, message: str) -> None:
        self._in_headers = False
        self._stop_header_timer()
        if not self.transport.is_closing():
            self.logger.info("closing connection: %s", message)
            self.transport.write(error_bytes(code, message))
            self.transport.close()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None


def guarded_protocol(header_timeout_s: float, max_header_bytes: int) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` class with these limits (uvicorn instantiates the class itself)."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes},
    )
