"""What the routes depend on: the app's runtime (ready or not), the loaded model a request names, the
time a request has left, and cancellation when the client goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from app.api.errors import ApiError
from app.serving.runtime import Runtime

T = TypeVar("T")


def current_runtime(request: Request) -> Runtime | None:
    """The app's runtime; ``None`` before the lifespan started it."""
    rt: Runtime | None = request.app.state.runtime
    return rt


def ready_runtime(request: Request) -> Runtime:
    """The runtime if it can take work, else 503 ``not_ready`` / ``draining``."""
    rt = current_runtime(request)
    if rt is not None and rt.draining:
        raise ApiError("draining", "the service is shutting down")
    if rt is None or not rt.started:
        raise ApiError("not_ready", "the models are not loaded and warmed yet")
    if not rt.accepting:
        raise ApiError("not_ready", "the inference worker is not running")
    return rt


ReadyRuntime = Annotated[Runtime, Depends(ready_runtime)]


def loaded_model(rt: Runtime, name: str | None, field: str = "model") -> str:
    """``name`` (default: the default model) if it is loaded, else 422 naming ``field``."""
    name = rt.default_model if name is None else name
    if name not in rt.loaded:
        known = "known" if name in rt.store.names else "unknown"
        raise ApiError(
            "validation_error",
            f"model {name!r} is {known} but not loaded by this service; "
            f"loaded: {', '.join(sorted(rt.loaded))}",
            field,
        )
    return name


def time_left(started: float, deadline_s: float) -> float:
    """Seconds left of a ``deadline_s`` deadline for a request that started at ``started``
    (``time.perf_counter()``)."""
    return deadline_s - (time.perf_counter() - started)


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``; cancel it if the client disconnects first (its queued item is then skipped).

    Call only after the body has been read: the next ASGI message is then the disconnect.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and not watcher.done():
            raise  # we were cancelled ourselves
        raise ApiError("client_closed_request", "the client disconnected") from None
    finally:
        watcher.cancel()
