"""Every request and response body of the API (pydantic), with the OpenAPI examples, and the
conversions from the domain's typed results to them (the only place that knows both)."""

from __future__ import annotations

import base64
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from app.attacks.robustness import DEFAULT_STEPS, MAX_SEED, AttackSpec, ModelResult
from app.config import comma_list
from app.metric.queries import Invariance
from app.metric.store import Calibration, ModelEntry

#: A 1x1 PNG, base64, for the examples.
PNG_1PX = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"
)


def _integral(value: object) -> object:
    """JSON Schema counts ``3.0`` as an integer: accept integral floats for integer fields."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: A base64-encoded image (standard alphabet; a ``data:…;base64,`` prefix is accepted too).
Base64Image = Annotated[str, Field(min_length=1, json_schema_extra={"format": "byte"})]


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str = Field(examples=["the data is not an image in a known format"])
    field: str | None = Field(None, examples=["candidate[1]"])
    error_id: str | None = Field(None, description="only for internal_error; appears in the log")


class ErrorBody(BaseModel):
    error: ErrorDetail


def _names(value: object) -> object:
    """Accept a comma-separated string, or a list of such strings (repeated multipart field). Empty
    names are kept (and refused by the field's validation), repeats dropped."""
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list) and all(isinstance(v, str) for v in items):
        return comma_list(items, keep_empty=True)
    return value


class Invariant(BaseModel):
    """The ``invariance`` option of both endpoints."""

    invariance: Annotated[list[Invariance], BeforeValidator(_names)] = Field(
        default_factory=list,
        description="edits the distance ignores: hflip = the minimum over the candidate and its "
        "left-right mirror (one more trunk pass per candidate)",
    )


class DistanceOptions(Invariant):
    """Options shared by both encodings of ``POST /distance``."""

    model_config = ConfigDict(extra="forbid")
    #: Options that a multipart body may repeat (their values are joined).
    REPEATABLE: ClassVar[frozenset[str]] = frozenset({"invariance"})

    model: str | None = Field(
        None, description="model name (GET /models); default: the service's default model"
    )
    threshold: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="near-duplicate threshold; default: the model's threshold from the store",
    )
    spatial: bool = Field(False, description="include a spatial heat map (base64 PNG) per pair")
    spatial_scale: Literal["pair", "shared"] = Field(
        "pair",
        description="top of the heat maps' colour scale: each map's own peak, or the largest peak "
        "of the request (maps comparable across candidates); the value is in spatial_max",
    )
    per_layer: bool = Field(False, description="include the per-layer distances")


class DistanceJSON(DistanceOptions):
    """``POST /distance`` as ``application/json``: images as base64 (a ``data:`` URL prefix is allowed)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"reference": PNG_1PX, "candidates": [PNG_1PX], "model": "lpips-alex"}]
        },
    )

    reference: Base64Image = Field(description="base64-encoded image")
    candidates: list[Base64Image] = Field(min_length=1, description="base64-encoded images (1..N)")


class PairResult(BaseModel):
    distance: float = Field(ge=0, examples=[0.1834])
    near_duplicate: bool = Field(description="distance <= threshold")
    per_layer: list[float] | None = Field(None, description="only with per_layer=true")
    spatial_png: str | None = Field(
        None, description="base64 PNG heat map (magma colour map); only with spatial=true"
    )
    spatial_max: float | None = Field(
        None, ge=0, description="the per-pixel distance shown at the top of the colour scale"
    )
    mirrored: bool | None = Field(
        None, description="with invariance hflip: whether the candidate's mirror gave the distance"
    )


class Timing(BaseModel):
    """Milliseconds spent decoding, queued for the device, on the device, and in all."""

    decode: float
    queue: float
    inference: float
    total: float

    @classmethod
    def of(cls, decode_s: float, queued_s: float, device_s: float, total_s: float) -> Timing:
        """From seconds."""
        ms = 1000.0
        return cls(
            decode=decode_s * ms, queue=queued_s * ms, inference=device_s * ms, total=total_s * ms
        )


class ThresholdBasis(BaseModel):
    """Where a response's near-duplicate threshold came from."""

    source: Literal["request", "calibrated", "store"] = Field(
        description="request: the caller's; calibrated: the model's default, chosen at "
        "false_match_rate on unrelated natural images (docs/CALIBRATION.md); store: the model's "
        "default, not calibrated at a stated rate"
    )
    false_match_rate: float | None = Field(
        None, description="calibrated only: the share of unrelated image pairs allowed to match"
    )

    @classmethod
    def of(cls, entry: ModelEntry, from_request: bool) -> ThresholdBasis:
        if from_request:
            return cls(source="request")
        if entry.calibration is None:
            return cls(source="store")
        return cls(source="calibrated", false_match_rate=entry.calibration.false_match_rate)


class DistanceResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "lpips-alex",
                    "resolution": [256, 256],
                    "threshold": 0.2,
                    "threshold_basis": {"source": "request"},
                    "results": [
                        {"distance": 0.0412, "near_duplicate": True},
                        {"distance": 0.6731, "near_duplicate": False},
                    ],
                    "timing_ms": {"decode": 9.1, "queue": 3.2, "inference": 41.7, "total": 55.4},
                }
            ]
        }
    )

    model: str
    resolution: list[int] = Field(
        min_length=2, max_length=2, description="[H, W] the images were resized to"
    )
    threshold: float
    threshold_basis: ThresholdBasis
    invariance: list[Invariance] | None = Field(None, description="as requested; absent: none")
    results: list[PairResult] = Field(description="one per candidate, in candidate order")
    timing_ms: Timing


class ModelFile(BaseModel):
    path: str = Field(description="file name in the store or the offline weights folder")
    sha256: str | None = Field(description="sha256 of the verified copy (or the manifest's)")
    available: bool


class ModelInfo(BaseModel):
    name: str
    trunk: str = Field(examples=["alex"])
    variant: str
    source: str
    files: list[ModelFile]
    threshold: float
    calibration: Calibration | None = Field(
        description="how the threshold was calibrated (docs/CALIBRATION.md); null: not at a stated rate"
    )
    loaded: bool
    default: bool


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class Status(BaseModel):
    status: str = Field(examples=["ok"])


# -- POST /robustness-check --------------------------------------------------------------------


class RobustnessOptions(Invariant):
    """Attack options shared by both encodings (ε and step size in [0, 1] pixel units)."""

    model_config = ConfigDict(extra="forbid")
    #: Options that a multipart body may repeat (their values are joined).
    REPEATABLE: ClassVar[frozenset[str]] = frozenset({"models", "invariance"})

    models: list[str] | None = Field(
        None, description="models to attack; default: lpips-alex and the default model, once each"
    )
    attack: Literal["linf", "l2"] = Field("linf", description="the norm of the ε-ball")
    epsilon: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="radius in [0, 1] pixel units; default: L∞ 4/255, L2 1.0",
    )
    steps: Annotated[int, Field(ge=1), BeforeValidator(_integral)] | None = Field(
        None, description="PGD steps; default 20 (or the service's cap when it is lower)"
    )
    step_size: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="default: 2.5·ε/steps"
    )
    goal: Literal["evade", "impersonate"] = Field(
        "evade", description="evade: push a match apart; impersonate: pull a non-match together"
    )
    random_start: bool = Field(True, description="start from a random point of the ε-ball")
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_integral)] | None = Field(
        None,
        description="random seed (a fixed seed repeats the attack); default: random. At most 2^53 - 1, "
        "so that every JSON client reads and writes it exactly",
    )
    threshold: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="default: each model's threshold"
    )
    return_adversarial: bool = Field(
        False, description="return the adversarial and the attacked images as PNGs"
    )

    _split_models = field_validator("models", mode="before")(_names)

    def spec(self, max_steps: int) -> AttackSpec:
        """The requested attack (defaults still open: see :meth:`AttackSpec.resolved`); the default
        number of steps is held to ``max_steps``."""
        return AttackSpec(
            self.attack,
            self.epsilon,
            min(DEFAULT_STEPS, max_steps) if self.steps is None else self.steps,
            self.step_size,
            self.goal,
            self.random_start,
            self.seed,
        )


class RobustnessJSON(RobustnessOptions):
    """``POST /robustness-check`` as ``application/json``: base64 images."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"reference": PNG_1PX, "steps": 10}]}
    )
    reference: Base64Image = Field(description="base64-encoded image")
    candidate: Base64Image | None = Field(
        None, description="base64 image; absent: attack the reference itself"
    )


class AttackParams(BaseModel):
    """Every effective attack parameter (defaults filled, the seed drawn)."""

    attack: Literal["linf", "l2"]
    epsilon: float = Field(description="radius in [0, 1] pixel units")
    steps: int
    step_size: float
    goal: Literal["evade", "impersonate"]
    random_start: bool
    seed: int

    @classmethod
    def of(cls, spec: AttackSpec) -> AttackParams:
        """From a resolved :class:`AttackSpec`."""
        assert spec.epsilon is not None and spec.step_size is not None and spec.seed is not None
        return cls(
            attack=spec.norm,
            epsilon=spec.epsilon,
            steps=spec.steps,
            step_size=spec.step_size,
            goal=spec.goal,
            random_start=spec.random_start,
            seed=spec.seed,
        )


class Perturbation(BaseModel):
    """Measured norms of the returned 8-bit perturbation, in [0, 1] pixel units."""

    linf: float
    l2: float


class ModelOutcome(BaseModel):
    """One model's outcome: clean and attacked distance, and whether the decision flipped."""

    model: str
    clean_distance: float
    adversarial_distance: float = Field(description="measured on the returned 8-bit image")
    change: float = Field(description="adversarial_distance - clean_distance")
    threshold: float
    threshold_basis: ThresholdBasis
    clean_match: bool = Field(description="clean_distance <= threshold")
    adversarial_match: bool = Field(description="adversarial_distance <= threshold")
    flipped: bool
    perturbation: Perturbation
    adversarial_png: str | None = Field(
        None, description="the perturbed candidate as a lossless PNG; only with return_adversarial"
    )

    @classmethod
    def of(cls, r: ModelResult, basis: ThresholdBasis, png: bytes | None = None) -> ModelOutcome:
        return cls(
            model=r.model,
            threshold=r.threshold,
            threshold_basis=basis,
            clean_distance=r.clean_distance,
            adversarial_distance=r.adversarial_distance,
            change=r.change,
            clean_match=r.clean_match,
            adversarial_match=r.adversarial_match,
            flipped=r.flipped,
            perturbation=Perturbation(linf=r.linf, l2=r.l2),
            adversarial_png=None if png is None else base64.b64encode(png).decode("ascii"),
        )


class RobustnessResponse(BaseModel):
    attack: AttackParams
    resolution: list[int] = Field(min_length=2, max_length=2, description="[H, W] of the images")
    invariance: list[Invariance] | None = Field(
        None, description="as requested (distances attacked and measured with it); absent: none"
    )
    results: list[ModelOutcome] = Field(description="one entry per model, in request order")
    attacked_png: str | None = Field(
        None,
        description="the attacked image (the candidate, or the reference when there is none) as "
        "the models saw it: decoded, resized, 8-bit PNG; only with return_adversarial",
    )
    timing_ms: Timing
