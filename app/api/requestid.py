"""``X-Request-ID``: taken from the client (or the load balancer) when it is usable, else generated;
echoed on every response, refusals by middleware and errors included, and set in
:data:`app.logs.REQUEST_ID` so every log line of the request carries it (the access log too)."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import REQUEST_ID

HEADER = b"x-request-id"
#: Longest request ID accepted from a client; a longer or otherwise unusable one is replaced.
MAX_LENGTH = 128
#: Visible ASCII only: no spaces, control characters or bytes that could forge log lines.
_USABLE = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_LENGTH)


def request_id_of(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is 1 to :data:`MAX_LENGTH` visible ASCII characters,
    else a new random one (32 hex digits, like nginx's ``$request_id``)."""
    for key, value in scope["headers"]:
        if key == HEADER:
            return value.decode("ascii") if _USABLE.fullmatch(value) else uuid.uuid4().hex
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Outermost middleware: sets the request ID for the request's task and adds the header to the
    response start (replacing any the app set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)
        raw = request_id.encode("ascii")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, raw)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
