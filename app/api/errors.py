"""Every error the API returns, mapped in one place to ``{"error": {"code", "message", "field"?}}``.

Domain errors (:class:`ApiError`, the :class:`~app.imaging.ImageError` kinds, the runtime's
``Overloaded`` / ``DeadlineExceeded`` / ``Draining`` / ``WorkerStopped``), FastAPI's own 422 and
Starlette's 404/405 all get the same body. Anything else becomes a 500 ``internal_error`` whose ``error_id`` is logged with the stack
trace; the client never sees a trace.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.imaging import ImageError, ImageTooLarge, InvalidImage, UnsupportedFormat
from app.serving.errors import DeadlineExceeded, Draining, Overloaded, WorkerStopped

log = logging.getLogger("app.api")

#: The status of every error code the API uses (design brief, section 3).
STATUS: dict[str, int] = {
    "invalid_image": 400,
    "invalid_base64": 400,
    "invalid_json": 400,
    "invalid_multipart": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "request_timeout": 408,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "payload_too_large": 413,
    "image_too_large": 413,
    "unsupported_media_type": 415,
    "headers_too_large": 431,
    "validation_error": 422,
    "overloaded": 429,
    "client_closed_request": 499,
    "internal_error": 500,
    "not_ready": 503,
    "draining": 503,
    "deadline_exceeded": 504,
}

_IMAGE_CODES: dict[type[ImageError], str] = {
    InvalidImage: "invalid_image",
    ImageTooLarge: "image_too_large",
    UnsupportedFormat: "unsupported_media_type",
}

_CODE_OF_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
}


class ApiError(Exception):
    """An error with its API code (status from :data:`STATUS`), message and optional field."""

    def __init__(
        self,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status or STATUS[code]
        self.message = message
        self.field = field
        self.headers = headers

    @classmethod
    def from_image(cls, exc: ImageError) -> ApiError:
        """The error of an unusable image, naming the input it came from."""
        return cls(_IMAGE_CODES.get(type(exc), "invalid_image"), exc.message, exc.source)

    @classmethod
    def from_validation(cls, exc: ValidationError | RequestValidationError) -> ApiError:
        """A 422 naming the first offending field (or 400 for JSON that does not parse)."""
        first: dict[str, Any] = dict(exc.errors()[0]) if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        msg = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            return cls("invalid_json", f"the body is not valid JSON: {msg}")
        if first.get("type") in ("model_type", "model_attributes_type", "dict_type"):
            return cls("validation_error", "the JSON body must be an object")
        field = ".".join(loc) or None
        return cls("validation_error", f"{field}: {msg}" if field else msg, field)


def error_response(
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    status: int | None = None,
    **extra: str,
) -> JSONResponse:
    """The JSON error body with ``status`` (default: the status of ``code``)."""
    body: dict[str, str] = {"code": code, "message": message}
    if field:
        body["field"] = field
    body.update(extra)
    return JSONResponse({"error": body}, status_code=status or STATUS[code], headers=headers)


def to_api_error(exc: Exception) -> ApiError | None:
    """The API form of a known exception, ``None`` for unexpected ones."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ImageError):
        return ApiError.from_image(exc)
    if isinstance(exc, ValidationError | RequestValidationError):
        return ApiError.from_validation(exc)
    if isinstance(exc, Overloaded):
        return ApiError("overloaded", str(exc), headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, DeadlineExceeded):
        return ApiError("deadline_exceeded", str(exc))
    if isinstance(exc, Draining):
        return ApiError("draining", str(exc))
    if isinstance(exc, WorkerStopped):
        return ApiError("not_ready", str(exc))
    if isinstance(exc, ClientDisconnect):
        return ApiError("client_closed_request", "the client disconnected during the upload")
    if isinstance(exc, StarletteHTTPException):
        code = _CODE_OF_STATUS.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {}) or None
        return ApiError(code, str(exc.detail), headers=headers, status=exc.status_code)
    return None


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    api = to_api_error(exc)
    if api is None:
        raise exc
    if api.code == "client_closed_request":  # nobody reads the answer: one line, no trace
        log.info("client_closed_request %s %s", request.method, request.url.path)
    return error_response(api.code, api.message, api.field, api.headers, api.status)


def install(app: FastAPI) -> None:
    """Register the handlers and the catch-all 500 middleware on ``app``."""
    for kind in (
        ApiError,
        ImageError,
        RequestValidationError,
        ValidationError,
        Overloaded,
        DeadlineExceeded,
        Draining,
        WorkerStopped,
        ClientDisconnect,
        StarletteHTTPException,
    ):
        app.add_exception_handler(kind, _handle)
    app.add_middleware(InternalErrorMiddleware)


class InternalErrorMiddleware:
    """Turns an unexpected exception into a 500 ``internal_error`` with a logged ``error_id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            error_id = uuid.uuid4().hex[:16]
            log.exception(
                "internal_error error_id=%s %s %s", error_id, scope.get("method"), scope.get("path")
            )
            if started:
                raise
            response = error_response(
                "internal_error",
                f"an internal error occurred; quote error_id {error_id} when reporting it",
                error_id=error_id,
            )
            await response(scope, receive, send)
