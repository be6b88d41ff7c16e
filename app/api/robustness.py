"""``POST /robustness-check``: how far can an ε-bounded attack move the distance, per model?

One pipeline, one direction: read body → validate options and caps → decode + resize (thread pool) →
an attack *step job* built and run on the device worker (one PGD step per turn, so ``/distance``
batches go first between steps) → encode. Each model is attacked white-box on its own gradients.
"""

from __future__ import annotations

import asyncio
import base64
import time
from functools import partial

from fastapi import APIRouter, Request

from app.api.bodies import ERROR_RESPONSES, ROBUSTNESS_BODY
from app.api.deps import ReadyRuntime, loaded_model, time_left, until_disconnect
from app.api.errors import ApiError
from app.api.inputs import ImageField, read_body
from app.api.schemas import (
    AttackParams,
    ModelOutcome,
    RobustnessJSON,
    RobustnessOptions,
    RobustnessResponse,
    ThresholdBasis,
    Timing,
)
from app.attacks.robustness import AttackSpec, ModelResult
from app.imaging import tensor_to_png
from app.metric.queries import Image
from app.metric.store import BASELINE_MODEL
from app.serving.runtime import Runtime

router = APIRouter()

FIELDS = (
    ImageField("reference", "reference"),
    ImageField("candidate", "candidate", required=False),
)


def _spec(rt: Runtime, o: RobustnessOptions) -> AttackSpec:
    """The effective attack, within the service's caps (422 naming the field otherwise)."""
    caps = rt.settings
    if o.steps is not None and o.steps > caps.max_attack_steps:
        raise ApiError(
            "validation_error",
            f"steps {o.steps} is over the cap of {caps.max_attack_steps}",
            "steps",
        )
    cap = caps.max_attack_epsilon if o.attack == "linf" else caps.max_attack_epsilon_l2
    if o.epsilon is not None and o.epsilon > cap:
        raise ApiError(
            "validation_error",
            f"epsilon {o.epsilon} is over the {o.attack} cap of {cap:.6g}",
            "epsilon",
        )
    try:
        return o.spec(caps.max_attack_steps).resolved()
    except ValueError as exc:
        raise ApiError("validation_error", str(exc)) from None


def _thresholds(rt: Runtime, o: RobustnessOptions) -> dict[str, float]:
    """The models to attack (loaded ones only, 422 otherwise) and each one's threshold."""
    names = list(dict.fromkeys(o.models or [BASELINE_MODEL, rt.default_model]))
    if not names:
        raise ApiError("validation_error", "models must name at least one model", "models")
    names = [loaded_model(rt, n, "models") for n in names]
    return {n: rt.threshold(n) if o.threshold is None else o.threshold for n in names}


async def _outcomes(
    rt: Runtime, results: list[ModelResult], pngs: bool, given: bool
) -> list[ModelOutcome]:
    """The per-model bodies (``given``: the request set the threshold); the adversarial PNGs are
    encoded in the decode pool."""
    bases = [ThresholdBasis.of(rt.store.model(r.model), given) for r in results]
    if not pngs:
        return [ModelOutcome.of(r, b) for r, b in zip(results, bases, strict=True)]
    encoded = await asyncio.gather(*(rt.run_cpu(r.png) for r in results))
    return [ModelOutcome.of(r, b, p) for r, b, p in zip(results, bases, encoded, strict=True)]


async def _png(rt: Runtime, image: Image) -> str:
    """The decoded image as a base64 8-bit PNG (encoded in the decode pool)."""
    png = await rt.run_cpu(partial(tensor_to_png, image.tensor))
    return base64.b64encode(png).decode("ascii")


@router.post(
    "/robustness-check",
    response_model=RobustnessResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=ROBUSTNESS_BODY,
    summary="white-box PGD within an ε-ball against each model: how far does the distance move?",
)
async def robustness_check(request: Request, rt: ReadyRuntime) -> RobustnessResponse:
    """Multipart (file ``reference``, optional file ``candidate``, option fields) or JSON (base64)."""
    started = time.perf_counter()
    body = await read_body(request, FIELDS, RobustnessJSON, RobustnessOptions, 1)
    opts = body.options
    spec, thresholds = _spec(rt, opts), _thresholds(rt, opts)
    rt.check_attack()  # refuse before decoding when every attack slot is taken
    t_decode = time.perf_counter()
    deadline_s = rt.settings.attack_deadline_s
    images = await until_disconnect(request, rt.decode(body.images, time_left(started, deadline_s)))
    decode_s = time.perf_counter() - t_decode
    candidate = images[1] if len(images) > 1 else None
    invariance = tuple(opts.invariance)
    left = time_left(started, deadline_s)
    work = rt.attack(images[0], candidate, thresholds, spec, left, invariance)
    done = await until_disconnect(request, work)
    attacked = images[-1]  # the candidate, or the reference when there is none
    return RobustnessResponse(
        attack=AttackParams.of(spec),
        resolution=[rt.resolution, rt.resolution],
        invariance=list(invariance) or None,
        results=await _outcomes(
            rt, done.value, opts.return_adversarial, opts.threshold is not None
        ),
        attacked_png=await _png(rt, attacked) if opts.return_adversarial else None,
        timing_ms=Timing.of(decode_s, done.queued_s, done.device_s, time.perf_counter() - started),
    )
