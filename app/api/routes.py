"""HTTP routes: ``POST /distance``, ``GET /models``, ``/healthz``, ``/readyz``, ``/metrics``.

``/distance`` is one pipeline, one direction: read body → validate → decode + resize (thread pool) →
admission + micro-batch (device worker) → split results → encode. Errors are raised as exceptions and
mapped to bodies in :mod:`app.api.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from app.api.errors import ApiError, error_response
from app.api.inputs import decode_images, read_distance
from app.api.schemas import (
    DISTANCE_BODY,
    ERROR_RESPONSES,
    DistanceResponse,
    ErrorBody,
    ModelsResponse,
    PairResult,
    Status,
    Timing,
)
from app.engine import Answer, Query
from app.imaging import heatmap_png
from app.metric.store import ModelStore
from app.service import Runtime, describe_models
from app.telemetry import Telemetry

router = APIRouter()
T = TypeVar("T")


def current_runtime(request: Request) -> Runtime | None:
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


def _model(rt: Runtime, name: str | None) -> str:
    name = name or rt.default_model
    if name not in rt.loaded:
        known = "known" if name in rt.store.names else "unknown"
        raise ApiError(
            "validation_error",
            f"model {name!r} is {known} but not loaded by this service; "
            f"loaded: {', '.join(sorted(rt.loaded))}",
            "model",
        )
    return name


async def _heatmaps(rt: Runtime, answer: Answer) -> list[str] | None:
    if answer.spatial is None:
        return None
    loop = asyncio.get_running_loop()
    pngs = await asyncio.gather(
        *(loop.run_in_executor(rt.decode_pool, heatmap_png, m) for m in answer.spatial)
    )
    return [base64.b64encode(p).decode("ascii") for p in pngs]


@router.post(
    "/distance",
    response_model=DistanceResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=DISTANCE_BODY,
    summary="LPIPS / R-LPIPS distance between a reference and 1..N candidates",
)
async def distance(request: Request, rt: ReadyRuntime) -> DistanceResponse:
    """Multipart (file ``reference``, repeated file ``candidate``) or JSON (base64). Images are resized
    to the working resolution; results come in candidate order."""
    started = time.perf_counter()
    deadline = started + rt.settings.deadline_s
    inp = await read_distance(request, rt.settings.max_candidates)
    model = _model(rt, inp.options.model)
    threshold = inp.options.threshold
    threshold = rt.threshold(model) if threshold is None else threshold
    rt.batcher.check_admission(len(inp.candidates))  # refuse before decoding when the queue is full
    items = [("reference", inp.reference)]
    items += [(f"{inp.field}[{i}]", c) for i, c in enumerate(inp.candidates)]
    t_decode = time.perf_counter()
    images = await decode_images(rt, items)
    decode_s = time.perf_counter() - t_decode
    query = Query(model, images[0], tuple(images[1:]), inp.options.spatial)
    timeout = deadline - time.perf_counter()
    done = await until_disconnect(request, rt.batcher.submit(query, query.pairs, timeout))
    pngs = await _heatmaps(rt, done.value)
    results = [
        PairResult(
            distance=d,
            near_duplicate=d <= threshold,
            per_layer=done.value.per_layer[i] if inp.options.per_layer else None,
            spatial_png=pngs[i] if pngs else None,
        )
        for i, d in enumerate(done.value.distances)
    ]
    ms = 1000.0
    return DistanceResponse(
        model=model,
        resolution=(rt.resolution, rt.resolution),
        threshold=threshold,
        results=results,
        timing_ms=Timing(
            decode=decode_s * ms,
            queue=done.queued_s * ms,
            inference=done.device_s * ms,
            total=(time.perf_counter() - started) * ms,
        ),
    )


@router.get(
    "/models",
    response_model=ModelsResponse,
    responses={401: ERROR_RESPONSES[401]},
    summary="every model in the store",
)
async def models(request: Request) -> ModelsResponse:
    store: ModelStore = request.app.state.store
    rt = current_runtime(request)
    loaded = rt.loaded if rt is not None else set()
    default = rt.default_model if rt is not None else request.app.state.default_model
    listing = await asyncio.to_thread(describe_models, store, loaded, default)
    return ModelsResponse.model_validate({"models": listing})


@router.get("/healthz", response_model=Status, summary="liveness: 200 while the process runs")
async def healthz() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    response_model=Status,
    responses={503: {"model": ErrorBody}},
    summary="readiness: 200 once every model is loaded and warmed and the worker is alive",
)
async def readyz(request: Request) -> Response:
    """503 also while the device fails batch after batch (work is still taken: a success, or the probe
    sent from here, brings readiness back)."""
    try:
        rt = ready_runtime(request)
    except ApiError as exc:
        return error_response(exc.code, exc.message)
    if rt.batcher.failing:
        rt.probe()
        return error_response(
            "not_ready", f"the last {rt.batcher.failures} device batches failed; see the log"
        )
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
    summary="Prometheus metrics (text format)",
)
async def metrics(request: Request) -> Response:
    telemetry: Telemetry = request.app.state.telemetry
    return Response(telemetry.render(), media_type=telemetry.content_type)
