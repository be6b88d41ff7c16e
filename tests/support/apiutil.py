"""Helpers for the API and end-to-end tests: settings (real or tiny weights), an app run through its
lifespan, metric lookup, sample payloads, raw ASGI calls and a held device."""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.main import create_app
from app.serving.runtime import Runtime
from tests.support import IMAGENET

#: Test settings: 64×64 working resolution unless overridden, fast flushes, and lpips-alex as the
#: default model (pass ``default_model=None`` for the store's default).
BASE: dict[str, Any] = {
    "default_model": "lpips-alex",
    # banks of tests that do not pass their own data_dir: a per-process scratch folder, not ./data
    "data_dir": Path(tempfile.gettempdir()) / f"rlpips-test-data-{os.getpid()}",
    "resolution": 64,
    "max_wait_ms": 20,
    "models": ["lpips-alex"],
}


def settings(weights_dir: Path, **kw: Any) -> Settings:
    """:data:`BASE` settings on the repository's store with the offline (real) weights."""
    return Settings(**(BASE | {"weights_dir": weights_dir} | kw))


def tiny_settings(tiny_store: Path, **kw: Any) -> Settings:
    """:data:`BASE` settings on the tiny random-weight store (the ``tiny_store`` fixture): its
    ``lpips-alex`` has random weights, so only for tests whose assertions do not depend on real LPIPS
    values; needs no offline weights."""
    return Settings(**(BASE | {"model_store": tiny_store, "weights_dir": None} | kw))


@asynccontextmanager
async def serve(s: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """An app with ``s``, started through its lifespan, and a client talking to it over ASGI."""
    app = create_app(s)
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, app


def runtime(app: FastAPI) -> Runtime:
    rt: Runtime = app.state.runtime
    return rt


def jpegs(n: int, start: int = 0) -> list[bytes]:
    """``n`` real ImageNet JPEGs (bytes)."""
    files = sorted(IMAGENET.glob("*.JPEG"))[start : start + n]
    assert len(files) == n, f"need {n} images in {IMAGENET}"
    return [f.read_bytes() for f in files]


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def multipart(reference: bytes, *candidates: bytes) -> list[tuple[str, tuple[str, bytes]]]:
    files = [("reference", ("ref.jpg", reference))]
    files += [("candidate", (f"c{i}.jpg", c)) for i, c in enumerate(candidates)]
    return files


def metric(text: str, name: str, /, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds (fails the test after ``timeout_s``)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def call_then_disconnect(
    app: FastAPI, request: httpx.Request, gone: asyncio.Event
) -> tuple[asyncio.Future[None], list[dict[str, Any]]]:
    """Call ``app`` with ``request`` over raw ASGI; the client disconnects once ``gone`` is set.

    Returns the running call and the list the app's ASGI messages are appended to.
    """
    messages = [{"type": "http.request", "body": request.read(), "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.url.path,
        "raw_path": request.url.raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
    }
    return asyncio.ensure_future(app(scope, receive, send)), sent


def hold_device(rt: Runtime) -> threading.Event:
    """Occupy the device thread until the returned event is set (a fake long batch).

    Returns once the fake batch is running, so ``rt.worker.backlog`` counts only real work after it.
    """
    gate, running = threading.Event(), threading.Event()

    def hold() -> None:
        running.set()
        gate.wait(60)

    rt.worker.submit(hold)
    assert running.wait(30), "the device worker did not pick up the fake batch"
    return gate
