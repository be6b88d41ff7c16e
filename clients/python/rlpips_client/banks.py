"""Typed results of the known-items bank calls (``raw`` keeps the JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BankInfo:
    """A bank's settings, item count and stored bytes."""

    name: str
    model: str
    threshold: float
    items: int
    bytes: int
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BankInfo:
        return cls(
            str(raw["name"]),
            str(raw["model"]),
            float(raw["threshold"]),
            int(raw["items"]),
            int(raw["bytes"]),
            raw,
        )


@dataclass(frozen=True)
class BankMatch:
    """An item within the threshold of the searched image."""

    id: str
    distance: float
    near_duplicate: bool
    mirrored: bool | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BankMatch:
        m = raw.get("mirrored")
        return cls(
            str(raw["id"]),
            float(raw["distance"]),
            bool(raw["near_duplicate"]),
            None if m is None else bool(m),
        )


@dataclass(frozen=True)
class BankSearchResult:
    """Matches nearest first; ``complete``: every item the lower bound kept was checked exactly."""

    matches: tuple[BankMatch, ...]
    checked: int
    candidates: int
    complete: bool
    threshold: float
    timing_ms: dict[str, float]
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BankSearchResult:
        return cls(
            tuple(BankMatch.from_json(m) for m in raw["matches"]),
            int(raw["checked"]),
            int(raw["candidates"]),
            bool(raw["complete"]),
            float(raw["threshold"]),
            {str(k): float(v) for k, v in raw["timing_ms"].items()},
            raw,
        )


def statuses(raw: dict[str, Any]) -> dict[str, str]:
    """``{item id: "added" | "replaced" | "unchanged"}`` of an add answer."""
    return {str(s["id"]): str(s["status"]) for s in raw["items"]}
