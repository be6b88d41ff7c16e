"""Logging of the service: the request ID in every log line, and text or JSON lines.

:data:`REQUEST_ID` holds the ID of the request being handled (set by
:class:`~app.api.requestid.RequestIdMiddleware` for the task that runs the request, which also writes
uvicorn's access-log line); :class:`RequestIdFilter` copies it onto every record as ``request_id``
(``-`` outside a request, e.g. in the device worker thread). :func:`log_config` is the ``logging``
dict-config of ``rlpips serve`` for uvicorn's loggers and the app's, in ``text`` or ``json`` format.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import Any, Literal

LogFormat = Literal["text", "json"]

#: The ID of the request the current task is handling; ``-`` outside a request.
REQUEST_ID: ContextVar[str] = ContextVar("rlpips_request_id", default="-")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the current request's, else ``-``) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``request_id``,
    ``message`` and, with an exception, ``exception`` (the formatted trace, in the log only)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def log_config(log_format: LogFormat, level: str) -> dict[str, Any]:
    """The dict-config for uvicorn (``uvicorn.Config(log_config=...)``) and the ``app`` loggers: one
    stderr handler (``default``) and uvicorn's stdout handler for the access log, both with the
    request ID filter."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    handler = {"formatter": "main", "filters": ["request_id"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"main": formatter},
        "handlers": {
            "default": {**handler, "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
            "access": {**handler, "class": "logging.StreamHandler", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": ["access"], "level": level.upper(), "propagate": False},
            "app": {"handlers": ["default"], "level": level.upper(), "propagate": False},
        },
    }
