"""``POST /robustness-check``: how far can an ε-bounded attack move the distance, per model?

One pipeline, one direction: read body → validate options and caps → decode + resize (thread pool) →
an attack *step job* on the device worker (one PGD step per turn, so ``/distance`` batches go first
between steps) → encode. Each model is attacked white-box on its own gradients.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile

from app.api.errors import ApiError
from app.api.inputs import b64decode, decode_images, media_type, read_form
from app.api.routes import ReadyRuntime, until_disconnect
from app.api.schemas import _PNG_1PX, ERROR_RESPONSES, Base64Image
from app.robustness import AttackSpec, ModelResult, RobustnessJob, Target
from app.service import BASELINE_MODEL, Runtime

router = APIRouter()
OPTION_FIELDS = (
    "models", "attack", "epsilon", "steps", "step_size", "goal", "random_start", "seed",
    "threshold", "return_adversarial",
)  # fmt: skip


class RobustnessOptions(BaseModel):
    """Attack options shared by both encodings (ε and step size in [0, 1] pixel units)."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] | None = Field(
        None, description="models to attack; default: lpips-alex and the default model, once each"
    )
    attack: Literal["linf", "l2"] = "linf"
    epsilon: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="default: L∞ 4/255, L2 1.0"
    )
    steps: int = Field(20, ge=1, description="PGD steps (capped by the service)")
    step_size: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="default: 2.5·ε/steps"
    )
    goal: Literal["evade", "impersonate"] = "evade"
    random_start: bool = True
    seed: int | None = Field(None, ge=0, lt=2**63)
    threshold: float | None = Field(None, ge=0, allow_inf_nan=False)
    return_adversarial: bool = False

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        """Accept a comma-separated string, or a list of such strings (repeated multipart field)."""
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return [n.strip() for v in items for n in v.split(",") if n.strip()]
        return value


class RobustnessJSON(RobustnessOptions):
    """``POST /robustness-check`` as ``application/json``: base64 images."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"reference": _PNG_1PX, "steps": 10}]}
    )
    reference: Base64Image = Field(description="base64-encoded image")
    candidate: Base64Image | None = Field(
        None, description="base64 image; absent: attack the reference itself"
    )


def _form_field(kind: str, **schema: Any) -> dict[str, Any]:
    return {"type": kind, **schema}


#: ``POST /robustness-check`` request body in both encodings (the route reads the raw request).
ROBUSTNESS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["reference"],
                    "properties": {
                        "reference": _form_field("string", format="binary"),
                        "candidate": _form_field("string", format="binary"),
                        "models": _form_field("string", description="comma-separated names"),
                        "attack": _form_field("string", enum=["linf", "l2"]),
                        "epsilon": _form_field("number", minimum=0, maximum=1),
                        "steps": _form_field("integer", minimum=1),
                        "step_size": _form_field("number", exclusiveMinimum=0, maximum=1),
                        "goal": _form_field("string", enum=["evade", "impersonate"]),
                        "random_start": _form_field("boolean"),
                        "seed": _form_field("integer", minimum=0),
                        "threshold": _form_field("number", minimum=0),
                        "return_adversarial": _form_field("boolean"),
                    },
                }
            },
            "application/json": {
                "schema": RobustnessJSON.model_json_schema(),
                "example": {"reference": _PNG_1PX, "steps": 10, "seed": 0},
            },
        },
    }
}


class RobustnessResponse(BaseModel):
    attack: dict[str, Any] = Field(description="every effective attack parameter, seed included")
    resolution: list[int] = Field(min_length=2, max_length=2, description="[H, W] of the images")
    results: list[dict[str, Any]] = Field(description="one entry per model, in request order")
    timing_ms: dict[str, float]


async def _read(request: Request) -> tuple[bytes, bytes | None, RobustnessOptions]:
    kind = media_type(request)
    try:
        if kind == "multipart/form-data":
            return await _read_form(request)
        if kind == "application/json" or kind.endswith("+json"):
            doc = RobustnessJSON.model_validate_json(await request.body())
            cand = None if doc.candidate is None else b64decode(doc.candidate, "candidate")
            opts = RobustnessOptions.model_validate(doc.model_dump(include=set(OPTION_FIELDS)))
            return b64decode(doc.reference, "reference"), cand, opts
    except ValidationError as exc:
        raise ApiError.from_validation(exc) from None
    raise ApiError(
        "unsupported_media_type",
        f"content type {kind or '(none)'!r} is not supported; send multipart/form-data or application/json",
    )


async def _read_form(request: Request) -> tuple[bytes, bytes | None, RobustnessOptions]:
    form = await read_form(request, max_files=4)
    try:
        unknown = sorted(set(form.keys()) - {"reference", "candidate", *OPTION_FIELDS})
        if unknown:
            raise ApiError("validation_error", f"unknown field {unknown[0]!r}", unknown[0])
        files: dict[str, bytes | None] = {}
        for name in ("reference", "candidate"):
            values = form.getlist(name)
            if len(values) > 1 or (values and not isinstance(values[0], UploadFile)):
                raise ApiError("validation_error", f"at most one file field {name!r}", name)
            files[name] = (
                await values[0].read() if values and isinstance(values[0], UploadFile) else None
            )
        if files["reference"] is None:
            raise ApiError(
                "validation_error", "the file field 'reference' is required", "reference"
            )
        raw: dict[str, object] = {}
        for key in OPTION_FIELDS:
            values = form.getlist(key)
            if not values:
                continue
            if not all(isinstance(v, str) for v in values) or (key != "models" and len(values) > 1):
                raise ApiError("validation_error", f"{key} must be given once, as text", key)
            raw[key] = values if key == "models" else values[0]
        return files["reference"], files["candidate"], RobustnessOptions.model_validate(raw)
    finally:
        await form.close()


def _spec(rt: Runtime, o: RobustnessOptions) -> AttackSpec:
    """The effective attack, within the service's caps (422 naming the field otherwise)."""
    caps = rt.settings
    if o.steps > caps.max_attack_steps:
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
    spec = AttackSpec(o.attack, o.epsilon, o.steps, o.step_size, o.goal, o.random_start, o.seed)
    try:
        return spec.resolved()
    except ValueError as exc:
        raise ApiError("validation_error", str(exc)) from None


def _targets(rt: Runtime, o: RobustnessOptions) -> list[Target]:
    names = list(dict.fromkeys(o.models or [BASELINE_MODEL, rt.default_model]))
    if not names:
        raise ApiError("validation_error", "models must name at least one model", "models")
    missing = [n for n in names if n not in rt.loaded]
    if missing:
        loaded = ", ".join(sorted(rt.loaded))
        raise ApiError(
            "validation_error", f"model {missing[0]!r} is not loaded; loaded: {loaded}", "models"
        )
    return [
        Target(n, rt.engine.metric(n), rt.threshold(n) if o.threshold is None else o.threshold)
        for n in names
    ]


def _attack(job: RobustnessJob) -> Generator[None, None, list[ModelResult]]:
    """The step job: one PGD step per ``next()`` on the device thread, then the measured results."""
    for _ in job.steps():
        yield
    return job.results()[0]


@router.post(
    "/robustness-check",
    response_model=RobustnessResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=ROBUSTNESS_BODY,
    summary="white-box PGD within an ε-ball against each model: how far does the distance move?",
)
async def robustness_check(request: Request, rt: ReadyRuntime) -> RobustnessResponse:
    """Multipart (file ``reference``, optional file ``candidate``, option fields) or JSON (base64)."""
    started = time.perf_counter()
    deadline = started + rt.settings.deadline_s
    reference, candidate, opts = await _read(request)
    spec, targets = _spec(rt, opts), _targets(rt, opts)
    rt.jobs.check_admission()  # refuse before decoding when every attack slot is taken
    items = [("reference", reference)] + (
        [("candidate", candidate)] if candidate is not None else []
    )
    t_decode = time.perf_counter()
    images = await decode_images(rt, items)
    decode_s = time.perf_counter() - t_decode
    pixels = [(im.tensor[None] + 1) / 2 for im in images]  # [1, 3, R, R] in [0, 1]
    try:
        job = RobustnessJob(pixels[0], pixels[1] if len(pixels) > 1 else None, targets, spec)
    except ValueError as exc:
        raise ApiError("validation_error", str(exc)) from None
    timeout = deadline - time.perf_counter()
    done = await until_disconnect(request, rt.jobs.run(_attack(job), timeout))
    ms = 1000.0
    return RobustnessResponse(
        attack=job.spec.as_dict(),
        resolution=(rt.resolution, rt.resolution),
        results=[r.as_dict(include_png=opts.return_adversarial) for r in done.value],
        timing_ms={
            "decode": decode_s * ms,
            "queue": done.queued_s * ms,
            "inference": done.device_s * ms,
            "total": (time.perf_counter() - started) * ms,
        },
    )
