"""Typed results: frozen dataclasses mirroring the service's response bodies (``raw`` keeps the JSON).

Base64 PNGs of the responses (heat maps, adversarial images) are decoded to ``bytes`` here.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any


def _png(value: object) -> bytes | None:
    return None if value is None else base64.b64decode(str(value))


def _floats(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


def _resolution(raw: dict[str, Any]) -> tuple[int, int]:
    h, w = raw["resolution"]
    return int(h), int(w)


@dataclass(frozen=True)
class Timing:
    """Milliseconds spent decoding, queued for the device, on the device, and in all."""

    decode: float
    queue: float
    inference: float
    total: float

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Timing:
        return cls(
            float(raw["decode"]), float(raw["queue"]), float(raw["inference"]), float(raw["total"])
        )


@dataclass(frozen=True)
class PairResult:
    """One candidate's distance to the reference; ``near_duplicate`` is ``distance <= threshold``."""

    distance: float
    near_duplicate: bool
    per_layer: tuple[float, ...] | None = None
    spatial_png: bytes | None = None
    #: The per-pixel distance at the top of the heat map's colour scale.
    spatial_max: float | None = None
    #: With ``invariance=["hflip"]``: whether the candidate's mirror gave the distance.
    mirrored: bool | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PairResult:
        top, mirrored = raw.get("spatial_max"), raw.get("mirrored")
        return cls(
            float(raw["distance"]),
            bool(raw["near_duplicate"]),
            _floats(raw.get("per_layer")),
            _png(raw.get("spatial_png")),
            None if top is None else float(top),
            None if mirrored is None else bool(mirrored),
        )


@dataclass(frozen=True)
class DistanceResult:
    """The answer of ``POST /distance``: one :class:`PairResult` per candidate, in candidate order."""

    model: str
    resolution: tuple[int, int]
    threshold: float
    results: tuple[PairResult, ...]
    timing_ms: Timing
    #: where ``threshold`` came from: ``request``, ``calibrated`` (at ``false_match_rate`` on unrelated
    #: natural images) or ``store``; ``None`` from services that do not say
    threshold_source: str | None
    false_match_rate: float | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def distances(self) -> list[float]:
        return [r.distance for r in self.results]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DistanceResult:
        basis = raw.get("threshold_basis") or {}
        return cls(
            str(raw["model"]),
            _resolution(raw),
            float(raw["threshold"]),
            tuple(PairResult.from_json(r) for r in raw["results"]),
            Timing.from_json(raw["timing_ms"]),
            basis.get("source"),
            None if basis.get("false_match_rate") is None else float(basis["false_match_rate"]),
            raw,
        )


@dataclass(frozen=True)
class AttackParams:
    """Every effective attack parameter (defaults filled, the seed drawn)."""

    attack: str
    epsilon: float
    steps: int
    step_size: float
    goal: str
    random_start: bool
    seed: int

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AttackParams:
        return cls(
            str(raw["attack"]),
            float(raw["epsilon"]),
            int(raw["steps"]),
            float(raw["step_size"]),
            str(raw["goal"]),
            bool(raw["random_start"]),
            int(raw["seed"]),
        )


@dataclass(frozen=True)
class ModelOutcome:
    """One model's outcome of a robustness check."""

    model: str
    clean_distance: float
    adversarial_distance: float
    change: float
    clean_match: bool
    adversarial_match: bool
    flipped: bool
    perturbation_linf: float
    perturbation_l2: float
    adversarial_png: bytes | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelOutcome:
        return cls(
            str(raw["model"]),
            float(raw["clean_distance"]),
            float(raw["adversarial_distance"]),
            float(raw["change"]),
            bool(raw["clean_match"]),
            bool(raw["adversarial_match"]),
            bool(raw["flipped"]),
            float(raw["perturbation"]["linf"]),
            float(raw["perturbation"]["l2"]),
            _png(raw.get("adversarial_png")),
        )


@dataclass(frozen=True)
class RobustnessResult:
    """The answer of ``POST /robustness-check``: one :class:`ModelOutcome` per model, in request order."""

    attack: AttackParams
    resolution: tuple[int, int]
    results: tuple[ModelOutcome, ...]
    timing_ms: Timing
    raw: dict[str, Any] = field(repr=False, compare=False)
    #: With ``return_adversarial``: the attacked image as the models saw it (PNG bytes).
    attacked_png: bytes | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RobustnessResult:
        return cls(
            AttackParams.from_json(raw["attack"]),
            _resolution(raw),
            tuple(ModelOutcome.from_json(r) for r in raw["results"]),
            Timing.from_json(raw["timing_ms"]),
            raw,
            _png(raw.get("attacked_png")),
        )


@dataclass(frozen=True)
class ModelFile:
    path: str
    sha256: str | None
    available: bool


@dataclass(frozen=True)
class ModelInfo:
    """One model of the service's store (``GET /models``)."""

    name: str
    trunk: str
    variant: str
    source: str
    files: tuple[ModelFile, ...]
    threshold: float
    loaded: bool
    default: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelInfo:
        files = tuple(
            ModelFile(str(f["path"]), f.get("sha256"), bool(f["available"])) for f in raw["files"]
        )
        return cls(
            str(raw["name"]),
            str(raw["trunk"]),
            str(raw["variant"]),
            str(raw["source"]),
            files,
            float(raw["threshold"]),
            bool(raw["loaded"]),
            bool(raw["default"]),
            raw,
        )
