"""Optional API keys: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (pure ASGI middleware).

With no keys configured every request passes. Otherwise a request needs one valid key, except on the
``open_paths`` (the probes, when configured open). Keys are compared as SHA-256 digests with
:func:`hmac.compare_digest` against *every* configured key, so the time taken does not depend on which
key (or how much of it) matched. A refusal is always the same 401 ``unauthorized`` body, whether the key
was missing, malformed or wrong. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Sequence

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_response

#: Paths that stay open when probes are configured open (``RLPIPS_OPEN_PROBES``, default true).
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

UNAUTHORIZED = (
    "a valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def presented_keys(headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """Every key the request offers: the token of ``Authorization: Bearer …`` and ``X-API-Key``."""
    keys = []
    for name, value in headers:
        text = value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                keys.append(token.strip())
        elif name == b"x-api-key" and text:
            keys.append(text)
    return keys


class ApiKeyMiddleware:
    """401 ``unauthorized`` for requests without a valid key (when ``keys`` is not empty)."""

    def __init__(
        self, app: ASGIApp, keys: Sequence[SecretStr], open_paths: Collection[str]
    ) -> None:
        self.app = app
        self._digests = [_digest(k.get_secret_value()) for k in keys]
        self.open_paths = frozenset(open_paths)

    def valid(self, key: str) -> bool:
        """Constant-time check of ``key`` against every configured key."""
        offered = _digest(key)
        match = False
        for known in self._digests:
            match |= hmac.compare_digest(offered, known)
        return match

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._digests or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        results = [self.valid(k) for k in presented_keys(scope["headers"])]
        if any(results):
            await self.app(scope, receive, send)
            return
        response = error_response(
            "unauthorized", UNAUTHORIZED, headers={"WWW-Authenticate": 'Bearer realm="rlpips"'}
        )
        await response(scope, receive, send)
