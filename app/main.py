"""The FastAPI app factory and its lifespan.

``create_app(settings)`` builds an app with its own settings, model store and metrics registry (so tests can
build several in one process); uvicorn runs it as ``app.main:create_app`` with ``factory=True``
(``rlpips serve``). The lifespan loads the configured models on the device thread, warms them at the
working resolution, starts the micro-batcher, and on shutdown drains queued work before stopping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Route

from app.api import banks, distance, errors, openapi, pages, probes, robustness
from app.api.auth import PROBE_PATHS, ApiKeyMiddleware
from app.api.middleware import (
    CloseWhileDrainingMiddleware,
    DrainMiddleware,
    MetricsMiddleware,
    RequestBodyMiddleware,
)
from app.api.requestid import RequestIdMiddleware
from app.bank.base import BankStorage
from app.bank.service import BankService
from app.bank.storage import open_storage
from app.config import Settings
from app.serving.runtime import Runtime, configured_models
from app.telemetry import Telemetry

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return version("rlpips-service")
    except PackageNotFoundError:
        return "0+unknown"


DESCRIPTION = """Perceptual similarity with LPIPS and the adversarially robust R-LPIPS.

Images are decoded (EXIF orientation applied, alpha composited on white), resized with antialiasing
to the service's working resolution and compared in micro-batches on the device. Every error has the
body `{"error": {"code", "message", "field"?}}`; each operation lists its codes with an example. Besides
those, unknown paths get 404 `not_found` and wrong methods 405 `method_not_allowed`; a request whose
client went away is logged and counted as 499 `client_closed_request`.

A page to try the metric is at [/ui](ui). With API keys configured, send one as `X-API-Key: <key>` or
`Authorization: Bearer <key>` (the Authorize button here)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime = Runtime(app.state.settings, app.state.store, app.state.telemetry)
    app.state.runtime = runtime
    app.state.banks = None
    storage: BankStorage | None = None
    follower: asyncio.Task[None] | None = None
    try:
        await runtime.start()
        s = app.state.settings
        try:
            storage = await asyncio.to_thread(
                open_storage, s.bank_engine, s.data_dir, s.bank_milvus_uri
            )
        except Exception:  # the metric still serves; /banks answers 503 not_ready
            log.exception("cannot open the bank storage (%s in %s)", s.bank_engine, s.data_dir)
        else:
            app.state.banks = BankService(
                runtime, storage, s.bank_grid, s.bank_embedding == "projected"
            )
            follower = asyncio.create_task(app.state.banks.follow(s.bank_refresh_s))
            for name in storage.names():
                info = storage.info(name)
                app.state.telemetry.bank_size(name, info.items if info else None)
        log.info("ready: serving %s (default %s)", ", ".join(runtime.models), runtime.default_model)
        yield
    finally:
        if follower is not None:
            follower.cancel()
        await runtime.stop()
        if storage is not None:
            storage.close()
        log.info("stopped")


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app; ``settings`` default to the environment (``RLPIPS_*``)."""
    settings = settings or Settings()
    store = settings.store()
    default_model, models = configured_models(settings, store)  # fail fast on unknown names
    app = FastAPI(
        title="R-LPIPS similarity service",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # app.api.pages serves /docs with local assets
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.default_model = default_model
    app.state.telemetry = Telemetry(version=_version())
    app.state.runtime = None
    openapi.install(app, settings, models)
    routers = [m.router for m in (distance, robustness, banks, probes, pages)]
    for router in routers:
        app.include_router(router)
    paths = {r.path for router in routers for r in router.routes if isinstance(r, APIRoute)}
    paths |= {r.path for r in app.routes if isinstance(r, Route)}

    def endpoint_of(path: str) -> str:
        return path if path in paths else "other"

    app.state.telemetry.declare_endpoints([*sorted(paths), "other"])

    def draining() -> bool:
        runtime: Runtime | None = app.state.runtime
        return runtime is not None and runtime.draining

    # Middleware, outermost last: request ID → metrics → close while draining → drain → API keys →
    # catch-all 500 → body → routes.
    app.add_middleware(
        RequestBodyMiddleware,
        max_bytes=settings.max_body_bytes,
        idle_s=settings.body_idle_timeout_s,
        total_s=settings.body_timeout_s,
    )
    errors.install(app)  # handlers + the catch-all 500 middleware (outside the body limit)
    open_paths = (PROBE_PATHS if settings.open_probes else frozenset()) | (
        pages.PAGE_PATHS if settings.open_pages else frozenset()
    )
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, open_paths=open_paths)
    app.add_middleware(
        DrainMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    app.add_middleware(CloseWhileDrainingMiddleware, draining=draining)
    app.add_middleware(MetricsMiddleware, telemetry=app.state.telemetry, endpoint_of=endpoint_of)
    app.add_middleware(RequestIdMiddleware)
    if settings.api_keys:
        log.info("API keys required (%d configured)", len(settings.api_keys))
    return app
