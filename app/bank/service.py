"""The bank pipeline on the serving runtime (no HTTP): create / info / drop banks, add / remove items,
search.

Adding: decode + resize (decode pool) → features and embeddings (device thread, step lane, so
distance batches go first) → lossless PNG of the resized image + one SQLite transaction (a worker
thread) → the in-memory index. Searching: decode → query features (device thread; cached as a
reference) → range search with radius = threshold in the lower-bound embedding (:mod:`.embedding`,
:mod:`.projection`: no true match is dismissed) → the survivors with the lowest bounds, at most
``max_checked``, are checked exactly: their trunk passes stop at the first layer whose partial
distance exceeds the threshold (:mod:`.exact`), and the rest get their distance through
:meth:`Engine.compute`, the code path of ``/distance`` (query = reference, items = candidates).
``complete`` says every survivor was checked, i.e. the answer is exactly the brute-force one.

Mirror option: the query and its left-right mirror both search, and an item's distance is
``min(d(q, item), d(flip q, item))`` — by the symmetry of LPIPS, what ``/distance`` answers with the
item as reference, the query as candidate and ``invariance: ["hflip"]``. No second index.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from app.bank.base import (
    Added,
    BankInfo,
    BankNotFound,
    BankSpec,
    BankStorage,
    NewItem,
    Vectors,
)
from app.bank.embedding import embed, radius
from app.bank.exact import possible_matches
from app.bank.projection import Projection, load
from app.imaging import load_tensor, tensor_to_png
from app.metric.queries import Image, Query, content_key, mirror
from app.metric.store import WeightsError
from app.serving.runtime import Runtime

log = logging.getLogger(__name__)
R = TypeVar("R")

#: Items per exact-stage engine call (one trunk pass for each).
EXACT_CHUNK = 64
#: Items per pruned pass (:mod:`.exact`): small batches keep 256² conv1 maps in the CPU's caches.
PRUNE_CHUNK = 16
#: Stored item images per decode task (several tasks run on the decode pool at once).
LOAD_CHUNK = 8


class BankConflict(Exception):
    """The bank exists with other settings, or was built at another working resolution."""


@dataclass(frozen=True)
class Match:
    id: str
    distance: float
    near_duplicate: bool
    mirrored: bool = False


@dataclass
class SearchResult:
    """Matches under the threshold in increasing distance; ``candidates``: items the lower bound kept;
    ``checked``: those given the exact distance; ``timing_ms`` per stage."""

    matches: list[Match]
    candidates: int
    checked: int
    threshold: float
    timing_ms: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.checked == self.candidates


class BankService:
    """Banks on ``storage``, computed with ``runtime``'s engine at its working resolution."""

    def __init__(
        self, runtime: Runtime, storage: BankStorage, grid: int, projected: bool = True
    ) -> None:
        self.rt = runtime
        self.storage = storage
        self.grid = grid
        self.projected = projected  # new banks use their model's projection when it has one
        self._projections: dict[str, Projection | None] = {}

    # -- helpers -------------------------------------------------------------------------------

    async def _device(self, fn: Callable[[], R], lane: str = "batch") -> R:
        future = self.rt.worker.submit(fn, lane="step" if lane == "step" else "batch")
        return await asyncio.wrap_future(future)

    def spec(self, name: str) -> BankSpec:
        info = self.storage.info(name)
        if info is None:
            raise BankNotFound(name)
        spec = info.spec
        if spec.resolution != self.rt.resolution:
            raise BankConflict(
                f"bank {name!r} was built at resolution {spec.resolution}; this service "
                f"works at {self.rt.resolution}"
            )
        if spec.embedding != "cells" and spec.embedding != self._embedding_of(spec.model):
            raise BankConflict(
                f"bank {name!r} was built with embedding {spec.embedding!r}; this service embeds "
                f"{spec.model!r} as {self._embedding_of(spec.model)!r}: re-create the bank"
            )
        return spec

    def projection(self, model: str) -> Projection | None:
        """``model``'s bank projection from the store (loaded once), or ``None`` without one."""
        if model not in self._projections:
            file_id = self.rt.store.model(model).bank_projection
            try:
                self._projections[model] = load(self.rt.store.resolve(file_id)) if file_id else None
            except WeightsError as exc:  # not fitted here (`make projection`): cell means
                log.warning("bank projection of %s unavailable, new banks use cell means: %s",
                            model, exc)  # fmt: skip
                self._projections[model] = None
        return self._projections[model]

    def _embedding_of(self, model: str) -> str:
        """The embedding a new bank of ``model`` gets."""
        p = self.projection(model) if self.projected else None
        return "cells" if p is None else p.key

    def _embed(self, spec: BankSpec, images: Sequence[Image], cache: bool) -> Vectors:
        """Device thread: ``spec``'s embeddings ``[N, D]`` float32 (host) of ``images``."""
        return self._embed_features(spec, images, cache)[0]

    def _embed_features(
        self, spec: BankSpec, images: Sequence[Image], cache: bool
    ) -> tuple[Vectors, list[torch.Tensor]]:
        """Device thread: embeddings (as :meth:`_embed`) and the normalised features (on the device)."""
        engine = self.rt.engine
        feats = engine.image_features(spec.model, images, cache=cache)
        heads = engine.heads[spec.model]
        with torch.inference_mode():
            if spec.embedding == "cells":
                e = embed(heads, feats, spec.grid)
            else:
                p = self.projection(spec.model)
                assert p is not None and p.key == spec.embedding  # checked by :meth:`spec`
                e = p.embed(heads, feats)
        return np.ascontiguousarray(e.cpu().numpy(), dtype=np.float32), feats

    async def follow(self, every_s: float) -> None:
        """Replicas sharing one SQLite file: apply the other processes' changes to this process's
        indexes every ``every_s`` seconds (storages with a ``refresh``; runs until cancelled)."""
        refresh: Callable[[], int] | None = getattr(self.storage, "refresh", None)
        if refresh is None or every_s <= 0:
            return
        while True:
            await asyncio.sleep(every_s)
            try:
                if await asyncio.to_thread(refresh):
                    for name in self.storage.names():
                        info = self.storage.info(name)
                        self.rt.telemetry.bank_size(name, info.items if info else None)
            except Exception:
                log.exception("bank refresh failed; retrying in %.1f s", every_s)

    # -- banks ---------------------------------------------------------------------------------

    async def create(self, name: str, model: str, threshold: float | None) -> tuple[BankInfo, bool]:
        """Create bank ``name`` (threshold default: the model's); an existing bank with the same
        settings is answered as it is (``created`` false), with others :class:`BankConflict`."""
        thr = self.rt.threshold(model) if threshold is None else threshold
        r = self.rt.resolution
        kind = await asyncio.to_thread(self._embedding_of, model)
        grid = self.grid if kind == "cells" else 0
        probe = Image(torch.zeros(3, r, r), "bank-dimension-probe")
        draft = BankSpec(name, model, float(thr), grid, r, 0, kind)
        dim = int((await self._device(lambda: self._embed(draft, [probe], False))).shape[1])
        spec = BankSpec(name, model, float(thr), grid, r, dim, kind)
        have, created = await asyncio.to_thread(self.storage.create, spec)
        if not created and (have.model, have.threshold) != (spec.model, spec.threshold):
            raise BankConflict(
                f"bank {name!r} exists with model {have.model!r} and threshold {have.threshold}"
            )
        info = self.storage.info(name)
        assert info is not None
        return info, created

    def info(self, name: str) -> BankInfo:
        info = self.storage.info(name)
        if info is None:
            raise BankNotFound(name)
        return info

    async def drop(self, name: str) -> None:
        if not await asyncio.to_thread(self.storage.drop, name):
            raise BankNotFound(name)

    # -- items ---------------------------------------------------------------------------------

    async def add(
        self, name: str, ids: Sequence[str], images: Sequence[Image]
    ) -> tuple[list[Added], dict[str, float]]:
        """Store decoded ``images`` under ``ids`` (acknowledged once committed); per-stage ms."""
        spec = self.spec(name)
        t0 = time.perf_counter()
        vecs = await self._device(lambda: self._embed(spec, images, False), lane="step")
        t1 = time.perf_counter()

        def store() -> list[Added]:
            pngs = [tensor_to_png(im.tensor, compress_level=1) for im in images]
            items = [
                NewItem(i, content_key(p), v, p) for i, p, v in zip(ids, pngs, vecs, strict=True)
            ]
            return self.storage.upsert(name, items)

        statuses = await self.rt.run_cpu(store)
        t2 = time.perf_counter()
        info = self.storage.info(name)
        if info is not None:
            self.rt.telemetry.bank_size(name, info.items)
        return statuses, {"embed": (t1 - t0) * 1e3, "store": (t2 - t1) * 1e3}

    async def remove(self, name: str, item_id: str) -> bool:
        self.spec(name)
        removed = await asyncio.to_thread(self.storage.remove, name, item_id)
        info = self.storage.info(name)
        if info is not None:
            self.rt.telemetry.bank_size(name, info.items)
        return removed

    # -- search --------------------------------------------------------------------------------

    async def search(
        self,
        name: str,
        query: Image,
        threshold: float | None,
        limit: int,
        max_checked: int,
        mirrored: bool = False,
    ) -> SearchResult:
        """Items within ``threshold`` (default: the bank's) of ``query``, nearest first, at most
        ``limit``; the exact distance for at most ``max_checked`` survivors of the lower bound."""
        spec = self.spec(name)
        thr = spec.threshold if threshold is None else threshold
        variants = [query, mirror(query)] if mirrored else [query]
        t0 = time.perf_counter()
        vecs, feats = await self._device(lambda: self._embed_features(spec, variants, True))
        t1 = time.perf_counter()
        count, found = await asyncio.to_thread(
            self.storage.candidates, name, vecs, radius(thr), max_checked
        )
        chosen = [i for i, _ in found]
        t_index = time.perf_counter()
        pngs = await asyncio.to_thread(self.storage.images, name, chosen)
        kept = [i for i in chosen if i in pngs]
        items = await self._decode([pngs[i] for i in kept], spec.resolution)
        t2 = time.perf_counter()
        qf = [[f[v : v + 1] for f in feats] for v in range(len(variants))]
        dist = await self._device(lambda: self._exact(spec.model, variants, qf, items, thr))
        t3 = time.perf_counter()
        matches = []
        for item_id, (d, m) in zip(kept, dist, strict=True):
            if d <= thr:
                matches.append(Match(item_id, d, True, m))
        matches.sort(key=lambda x: x.distance)
        timing = {
            "embed": (t1 - t0) * 1e3,
            "index": (t_index - t1) * 1e3,
            "load": (t2 - t_index) * 1e3,
            "exact": (t3 - t2) * 1e3,
        }
        return SearchResult(matches[:limit], count, len(kept), thr, timing)

    async def _decode(self, pngs: list[bytes], resolution: int) -> list[Image]:
        """Stored item PNGs as images, in parallel over the decode pool (PNG inflate releases the GIL;
        ~2.5 ms per 256² item on one core)."""

        def part(chunk: list[bytes]) -> list[Image]:
            return [Image(load_tensor(p, resolution), f"bank:{content_key(p)}") for p in chunk]

        chunks = [pngs[s : s + LOAD_CHUNK] for s in range(0, len(pngs), LOAD_CHUNK)]
        parts = await asyncio.gather(*(self.rt.run_cpu(functools.partial(part, c)) for c in chunks))
        return [im for p in parts for im in p]

    def _exact(
        self,
        model: str,
        variants: list[Image],
        features: list[list[torch.Tensor]],
        items: list[Image],
        threshold: float,
    ) -> list[tuple[float, bool]]:
        """Device thread: per item ``(distance, mirrored)``: the smallest over the query variants,
        each computed as ``/distance`` computes a pair (query as reference, items as candidates),
        for the items that may be within ``threshold`` (:mod:`.exact`); the others ``(inf, False)``
        (their distance is above the threshold, pruned layer by layer)."""
        engine = self.rt.engine
        keep: list[int] = []
        for s in range(0, len(items), PRUNE_CHUNK):
            tensors = [i.tensor for i in items[s : s + PRUNE_CHUNK]]
            found = possible_matches(engine, model, features, tensors, threshold).tolist()
            keep += [s + k for k in found]
        out: list[tuple[float, bool]] = [(float("inf"), False)] * len(items)
        for s in range(0, len(keep), EXACT_CHUNK):
            rows = keep[s : s + EXACT_CHUNK]
            kept = tuple(items[k] for k in rows)
            answers = engine.compute([Query(model, v, kept) for v in variants])
            for j, k in enumerate(rows):
                ds = [a.distances[j] for a in answers]
                best = int(np.argmin(ds))
                out[k] = (float(ds[best]), best == 1)
        return out
