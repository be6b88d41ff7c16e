"""What a request asks of the engine (:class:`Query`) and what it answers (:class:`Answer`), and the
invariances a query may ask for.

``hflip`` (mirror invariance): the distance of a pair is the minimum over the candidate and its
horizontal mirror, so that flipping an image does not evade a near-duplicate check. :func:`expand`
turns such a query into a plain one whose candidates are followed by their mirrors (one more trunk pass
per candidate; a mirror has its own cache key), and :func:`collapse` folds the engine's answer back:
per candidate the smaller distance, that variant's per-layer distances, and its heat map (a mirror's map
flipped back, so it lies over the candidate as uploaded).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Literal, get_args

from torch import Tensor

Invariance = Literal["hflip"]
INVARIANCES: tuple[Invariance, ...] = get_args(Invariance)


def content_key(data: bytes) -> str:
    """A 128-bit content hash of encoded image bytes (the cache key's first part)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Image:
    """An image for the device: ``tensor`` ``[3, H, W]`` float32 in ``[-1, 1]`` (CPU, or the device
    once decoded there) — or, while ``jpeg`` is set, not yet decoded: ``tensor`` is empty and the JPEG
    waits to be decoded on the model's device with its micro-batch (``RLPIPS_DECODE_DEVICE``,
    :mod:`app.device_decode`); ``source`` names the input for an error found then."""

    tensor: Tensor
    key: str
    jpeg: bytes | None = None
    source: str = ""


@dataclass(frozen=True)
class Query:
    """One request's work: ``reference`` against each of ``candidates`` with model ``model``."""

    model: str
    reference: Image
    candidates: tuple[Image, ...]
    spatial: bool = False
    invariance: tuple[Invariance, ...] = ()

    @property
    def pairs(self) -> int:
        """Pairs answered (one per candidate)."""
        return len(self.candidates)

    @property
    def work(self) -> int:
        """Pairs the device computes (a mirrored candidate is one more pair)."""
        return self.pairs * (1 + len(self.invariance))


@dataclass(frozen=True)
class Answer:
    """Per candidate: ``distances`` (≥ 0), ``per_layer`` (L values each), ``spatial`` ``[1, H, W]`` maps;
    with an invariance, ``mirrored[i]`` says whether candidate ``i``'s mirror gave its distance."""

    distances: list[float]
    per_layer: list[list[float]]
    spatial: list[Tensor] | None = None
    mirrored: list[bool] | None = None


def mirror(image: Image) -> Image:
    """``image`` flipped left to right, with its own cache key."""
    return Image(image.tensor.flip(-1), f"{image.key}:hflip")


def expand(query: Query) -> Query:
    """A plain query computing what ``query`` needs: its candidates, then their mirrors (``hflip``)."""
    for name in query.invariance:
        if name not in INVARIANCES:
            raise ValueError(f"invariance must be among {', '.join(INVARIANCES)}, got {name!r}")
    if not query.invariance:
        return query
    mirrors = tuple(mirror(c) for c in query.candidates)
    return replace(query, candidates=query.candidates + mirrors, invariance=())


def collapse(query: Query, answer: Answer) -> Answer:
    """The answer to ``query`` from the answer to :func:`expand` ``(query)``."""
    if not query.invariance:
        return answer
    n = query.pairs
    won = [answer.distances[n + i] < answer.distances[i] for i in range(n)]
    pick = [n + i if w else i for i, w in enumerate(won)]
    spatial = None
    if answer.spatial is not None:
        spatial = [
            answer.spatial[p].flip(-1) if w else answer.spatial[p]
            for p, w in zip(pick, won, strict=True)
        ]
    return Answer(
        distances=[answer.distances[p] for p in pick],
        per_layer=[answer.per_layer[p] for p in pick],
        spatial=spatial,
        mirrored=won,
    )
