"""``POST /distance``: one reference against 1..N candidates.

One pipeline, one direction: read body → validate → decode + resize (thread pool) → admission +
micro-batch (device worker) → split results → encode. Errors are raised as exceptions and mapped to
bodies in :mod:`app.api.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import time
from functools import partial

from fastapi import APIRouter, Request

from app.api.bodies import DISTANCE_BODY, ERROR_RESPONSES
from app.api.deps import ReadyRuntime, loaded_model, time_left, until_disconnect
from app.api.inputs import ImageField, read_body
from app.api.schemas import (
    DistanceJSON,
    DistanceOptions,
    DistanceResponse,
    PairResult,
    ThresholdBasis,
    Timing,
)
from app.imaging import heatmap_png
from app.metric.queries import Answer, Query
from app.serving.runtime import Runtime

router = APIRouter()

FIELDS = (
    ImageField("reference", "reference"),
    ImageField("candidate", "candidates", many=True),
)


def _peaks(answer: Answer, scale: str) -> list[float] | None:
    """Per map, the value at the top of its colour scale: its own peak, or the request's largest."""
    if answer.spatial is None:
        return None
    peaks = [float(m.max()) for m in answer.spatial]
    return [max(peaks)] * len(peaks) if scale == "shared" else peaks


async def _heatmaps(rt: Runtime, answer: Answer, peaks: list[float] | None) -> list[str] | None:
    """Base64 PNG heat maps of the answer's spatial maps (encoded in the decode pool)."""
    if answer.spatial is None or peaks is None:
        return None
    jobs = (
        rt.run_cpu(partial(heatmap_png, m, p)) for m, p in zip(answer.spatial, peaks, strict=True)
    )
    pngs = await asyncio.gather(*jobs)
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
    body = await read_body(
        request, FIELDS, DistanceJSON, DistanceOptions, rt.settings.max_candidates
    )
    opts = body.options
    model = loaded_model(rt, opts.model)
    threshold = rt.threshold(model) if opts.threshold is None else opts.threshold
    invariance = tuple(opts.invariance)
    work = body.counts["candidate"] * (1 + len(invariance))
    rt.check_distance(work)  # refuse before decoding when the queue is full
    with rt.telemetry.pairs_inflight(body.counts["candidate"]):
        t_decode = time.perf_counter()
        images = await until_disconnect(
            request,
            rt.decode(body.images, time_left(started, rt.settings.deadline_s), for_batch=True),
        )
        decode_s = time.perf_counter() - t_decode
        query = Query(model, images[0], tuple(images[1:]), opts.spatial, invariance)
        done = await until_disconnect(
            request, rt.distance(query, time_left(started, rt.settings.deadline_s))
        )
        peaks = _peaks(done.value, opts.spatial_scale)
        pngs = await _heatmaps(rt, done.value, peaks)
    rt.telemetry.distances_returned(model, done.value.distances)
    results = [
        PairResult(
            distance=d,
            near_duplicate=d <= threshold,
            per_layer=done.value.per_layer[i] if opts.per_layer else None,
            spatial_png=pngs[i] if pngs else None,
            spatial_max=peaks[i] if peaks else None,
            mirrored=done.value.mirrored[i] if done.value.mirrored else None,
        )
        for i, d in enumerate(done.value.distances)
    ]
    return DistanceResponse(
        model=model,
        resolution=[rt.resolution, rt.resolution],
        threshold=threshold,
        threshold_basis=ThresholdBasis.of(rt.store.model(model), opts.threshold is not None),
        invariance=list(invariance) or None,
        results=results,
        timing_ms=Timing.of(decode_s, done.queued_s, done.device_s, time.perf_counter() - started),
    )
