"""The model engine: trunks and heads on the device, batched distances, and the reference feature cache.

Trunks are keyed by their trunk *file* id, so every model that shares a trunk file (LPIPS and the heads-only
R-LPIPS variants) shares one module and one forward pass per image. A batch of :class:`Query` objects
(one reference, N candidates each) is computed with one trunk pass per *distinct* image per trunk (a
reference shared by N candidates runs once; references in the LRU cache do not run at all), then every
requested model's heads. Everything runs on the caller's thread — the device worker's — under a local
``torch.inference_mode()``, except with CPU streams (below), where whole queries run on the stream threads.

Precision: the trunk may run under ``torch.autocast`` (float16 / bfloat16); the channel normalisation and
the heads always run in float32, outside autocast. Only distance work uses autocast: :meth:`Engine.metric`
(attacks, gradients) is plain float32. On CUDA a batch crosses to the device as one pinned, non-blocking
copy and its results come back as one copy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch
from torch import Tensor

from app.metric.lpips import LPIPS, DistanceResult, Heads, distance_from_features, normalize
from app.metric.queries import Answer, Image, Query, collapse, expand
from app.metric.store import ModelStore
from app.metric.trunks import Trunk

log = logging.getLogger(__name__)

Features = list[Tensor]  # L normalised maps [N, C_l, H_l, W_l], float32
CacheKey = tuple[str, str, tuple[int, int]]  # (content hash, trunk file id, (H, W))


#: Compute dtypes a trunk may run in for distances (autocast below float32).
TRUNK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class EngineObserver(Protocol):
    def cache_lookup(self, hit: bool) -> None: ...
    def pairs_done(self, model: str, pairs: int) -> None: ...


class FeatureCache:
    """LRU of normalised reference features keyed by (content hash, trunk file, resolution).

    Bounded by ``max_entries`` and ``max_bytes``. Used from the device thread and the CPU stream threads
    (locked).
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[CacheKey, Features] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: CacheKey) -> Features | None:
        with self._lock:
            feats = self._data.get(key)
            if feats is not None:
                self._data.move_to_end(key)
            return feats

    def put(self, key: CacheKey, feats: Features) -> None:
        """Store ``feats`` (each ``[1, C_l, H_l, W_l]``, owning its memory); evicts the oldest."""
        size = sum(f.numel() * f.element_size() for f in feats)
        with self._lock:
            if key in self._data or self.max_entries == 0 or size > self.max_bytes:
                return
            self._data[key] = feats
            self.bytes += size
            while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self.bytes -= sum(f.numel() * f.element_size() for f in old)


class Engine:
    """Models ``models`` from ``store`` on ``device`` at working resolution ``resolution`` (square).

    ``precision``: the dtype the trunks run in for distances (float16 / bfloat16 via autocast, or
    float32); normalisation and heads stay float32 either way. ``channels_last``: trunk weights and
    input batches in channels-last memory format (2-core CPU, docs/benchmarks/optim.json: ×1.17 pairs/s
    at 256² and ×1.06 at 64² in batches of 32, ×1.87 at 64² one pair at a time; attack steps, which
    share the trunk, ×0.95 at 256²).

    ``streams`` > 1 (CPU): a small thread pool runs that many computations at once (inter-op
    parallelism; use with 1 intra-op thread). A batch with at least one reference per stream is dealt out
    in whole queries — queries sharing a reference together — so each stream runs its trunk pass, heads
    and distances alone, with no barrier between them (docs/BENCHMARKS.md, "CPU targets"); otherwise the
    batch's images are split into chunks, one per stream. On a
    few shared cores this keeps every core busy without the barrier stalls of multi-threaded kernels.
    """

    def __init__(
        self,
        store: ModelStore,
        models: Sequence[str],
        device: torch.device,
        resolution: int,
        cache: FeatureCache | None = None,
        observer: EngineObserver | None = None,
        streams: int = 1,
        precision: torch.dtype = torch.float32,
        channels_last: bool = True,
    ) -> None:
        if precision not in TRUNK_DTYPES:
            raise ValueError(f"precision must be one of {list(TRUNK_DTYPES)}, got {precision}")
        self.store = store
        self.names = list(dict.fromkeys(models))
        self.device = device
        self.resolution = resolution
        self.cache = cache if cache is not None else FeatureCache(0, 0)
        self.observer = observer
        self.streams = streams
        self.precision = precision
        self.channels_last = channels_last
        self._pool = ThreadPoolExecutor(streams, "rlpips-stream") if streams > 1 else None
        self.trunks: dict[str, Trunk] = {}
        self.heads: dict[str, Heads] = {}
        self.trunk_of: dict[str, str] = {}
        self._metrics: dict[str, LPIPS] = {}

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        """Load every model onto the device, one trunk module per trunk file (shared by its heads)."""
        metrics, _ = self.store.load_shared(self.names, self.device)
        for name, metric in metrics.items():
            trunk_id = self.store.model(name).trunk.file
            metric.trunk.to(memory_format=self._memory_format)
            self.trunks[trunk_id] = metric.trunk
            self.heads[name] = metric.heads
            self.trunk_of[name] = trunk_id
            log.info("loaded %s (trunk %s) on %s", name, trunk_id, self.device)
        self._metrics = metrics

    def metric(self, name: str) -> LPIPS:
        """The differentiable float32 :class:`LPIPS` of ``name``, sharing the loaded trunk (for attacks;
        never under the engine's autocast). Use it on the device thread only."""
        return self._metrics[name]

    def warmup(self) -> None:
        """Run every trunk and head once at the working resolution (also the spatial path)."""
        gen = torch.Generator().manual_seed(0)
        r = self.resolution
        imgs = [Image(torch.rand(3, r, r, generator=gen) * 2 - 1, f"warmup-{i}") for i in range(2)]
        queries = [Query(n, imgs[0], (imgs[1],), spatial=True) for n in self.names]
        self.compute(queries, use_cache=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- computing ---------------------------------------------------------------------------

    def __call__(self, queries: list[Query]) -> list[Answer]:
        """Answers for ``queries`` in order (the micro-batcher's ``process``)."""
        answers = self.compute(queries)
        if self.observer is not None:
            for q in queries:
                self.observer.pairs_done(q.model, q.pairs)
        return answers

    def image_features(self, model: str, images: Sequence[Image], cache: bool = False) -> Features:
        """Normalised float32 features (``[N, C_l, H_l, W_l]`` per layer, on the device) of ``images``
        with ``model``'s trunk, as :meth:`compute` makes them (call on the device thread). ``cache``:
        also keep each image's features in the reference cache, so that a :meth:`compute` with it as
        reference skips its trunk pass (the bank's exact stage after its embedding)."""
        trunk_id = self.trunk_of[model]
        with torch.inference_mode():
            feats = self._features(trunk_id, [i.tensor for i in images])
            if cache:
                for r, img in enumerate(images):
                    key = self._cache_key(img, trunk_id)
                    self.cache.put(key, [f[r : r + 1].clone() for f in feats])
        return feats

    def compute(self, queries: Sequence[Query], use_cache: bool = True) -> list[Answer]:
        """Distances for every query; one trunk pass per distinct (uncached) image per trunk (a
        query's invariances add their variants of the candidates: :mod:`app.metric.queries`)."""
        plain = [expand(q) for q in queries]
        answers = self._compute(plain, use_cache)
        return [collapse(q, a) for q, a in zip(queries, answers, strict=True)]

    def _compute(self, queries: Sequence[Query], use_cache: bool) -> list[Answer]:
        for q in queries:
            if q.model not in self.heads:
                raise KeyError(f"model {q.model!r} is not loaded")
        parts = deal(queries, self.streams) if self._pool is not None else []
        if len(parts) < self.streams:  # too few to deal out: split the images instead
            return self._compute_part(queries, use_cache, split=True)
        assert self._pool is not None
        futures = [
            self._pool.submit(self._compute_part, [queries[i] for i in part], use_cache, False)
            for part in parts
        ]
        out: list[Answer | None] = [None] * len(queries)
        for part, future in zip(parts, futures, strict=True):
            for i, answer in zip(part, future.result(), strict=True):
                out[i] = answer
        return [a for a in out if a is not None]

    def _compute_part(self, queries: Sequence[Query], use_cache: bool, split: bool) -> list[Answer]:
        """:meth:`_compute` of ``queries`` on this thread; ``split``: a trunk pass may use the streams."""
        by_trunk: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            by_trunk[self.trunk_of[q.model]].append(i)
        groups: list[tuple[list[int], DistanceResult]] = []
        with torch.inference_mode():
            for trunk_id, idx in by_trunk.items():
                group_queries = [queries[i] for i in idx]
                table, rows = self._feature_table(trunk_id, group_queries, use_cache, split)
                by_model: dict[str, list[int]] = defaultdict(list)
                for i in idx:
                    by_model[queries[i].model].append(i)
                for model, midx in by_model.items():
                    group = [queries[i] for i in midx]
                    groups.append((midx, self._distances(model, group, table, rows)))
        return _answers(queries, groups)

    def _feature_table(
        self, trunk_id: str, queries: list[Query], use_cache: bool, split: bool
    ) -> tuple[Features, dict[str, int]]:
        """Features of every distinct image of ``queries`` stacked as rows, and each key's row."""
        todo: dict[str, Tensor] = {}
        cached: dict[str, Features] = {}
        refs: set[str] = set()
        for q in queries:
            ref = q.reference
            if ref.key not in todo and ref.key not in cached:
                hit = self.cache.get(self._cache_key(ref, trunk_id)) if use_cache else None
                if use_cache and self.observer is not None:
                    self.observer.cache_lookup(hit is not None)
                if hit is not None:
                    cached[ref.key] = hit
                else:
                    todo[ref.key] = ref.tensor
                    refs.add(ref.key)
            for c in q.candidates:
                if c.key not in todo and c.key not in cached:
                    todo[c.key] = c.tensor
        keys = list(todo) + list(cached)
        computed = self._features(trunk_id, list(todo.values()), split) if todo else None
        table: Features = []
        for layer in range(len(self.trunks[trunk_id].spec.taps)):
            parts = [] if computed is None else [computed[layer]]
            parts += [cached[k][layer] for k in cached]
            table.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        rows = {k: r for r, k in enumerate(keys)}
        if use_cache:
            for q in queries:
                if q.reference.key in refs:
                    r = rows[q.reference.key]
                    feats = [t[r : r + 1].clone() for t in table]
                    self.cache.put(self._cache_key(q.reference, trunk_id), feats)
                    refs.discard(q.reference.key)
        return table, rows

    def _features(self, trunk_id: str, images: list[Tensor], split: bool = True) -> Features:
        """Normalised float32 features of ``images`` (each ``[3, H, W]`` in ``[-1, 1]``); ``split``:
        in chunks over the CPU streams."""
        x = self._to_device(images)
        trunk, dtype = self.trunks[trunk_id], self.precision
        if self._pool is None or not split or x.shape[0] < 2:
            return _forward(trunk, x, dtype)
        chunks = x.tensor_split(min(self.streams, x.shape[0]))
        parts = list(self._pool.map(lambda c: _forward(trunk, c, dtype), chunks))
        return [torch.cat([p[layer] for p in parts]) for layer in range(len(parts[0]))]

    def _to_device(self, images: list[Tensor]) -> Tensor:
        """``images`` stacked to ``[N, 3, H, W]`` on the device, in the trunk's memory format. CUDA:
        stacked straight into a pinned host buffer (torch's caching host allocator reuses it once the
        copy is done), one non-blocking copy for the whole batch, the layout change on the device."""
        if any(t.device != images[0].device for t in images):  # some decoded on the device
            images = [t.to(self.device) for t in images]
        if self.device.type != "cuda" or images[0].device.type == "cuda":
            x = torch.stack(images).to(self.device)
            return x.contiguous(memory_format=self._memory_format)
        first = images[0]
        pinned = torch.empty((len(images), *first.shape), dtype=first.dtype, pin_memory=True)
        torch.stack(images, out=pinned)
        x = pinned.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self._memory_format)

    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _distances(
        self, model: str, queries: list[Query], table: Features, rows: dict[str, int]
    ) -> DistanceResult:
        """On the device: ``total`` ``[P]`` and ``per_layer`` ``[P, L]`` for the P pairs of
        ``queries`` in order; ``spatial`` ``[S, 1, H, W]`` for the pairs of spatial queries only."""
        ref_rows = [rows[q.reference.key] for q in queries for _ in q.candidates]
        cand_rows = [rows[c.key] for q in queries for c in q.candidates]
        i0, i1 = self._index(ref_rows), self._index(cand_rows)
        size = None
        if any(q.spatial for q in queries):
            h, w = queries[0].reference.tensor.shape[-2:]
            size = (int(h), int(w))
        res = distance_from_features(
            self.heads[model], [t[i0] for t in table], [t[i1] for t in table], size
        )
        if res.spatial is None or all(q.spatial for q in queries):
            return res
        flags = [q.spatial for q in queries for _ in q.candidates]
        keep = self._index([p for p, wanted in enumerate(flags) if wanted])
        return DistanceResult(res.total, res.per_layer, res.spatial[keep])

    def _index(self, values: list[int]) -> Tensor:
        """An int64 index tensor on the device; on CUDA a pinned non-blocking copy, so building it
        does not wait for the trunk pass queued before it (integer, not boolean, indexing: no sync)."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=torch.int64, device=self.device)
        pinned = torch.tensor(values, dtype=torch.int64, pin_memory=True)
        return pinned.to(self.device, non_blocking=True)

    def _cache_key(self, image: Image, trunk_id: str) -> CacheKey:
        return (image.key, trunk_id, (int(image.tensor.shape[-2]), int(image.tensor.shape[-1])))


def deal(queries: Sequence[Query], streams: int) -> list[list[int]]:
    """Indices of ``queries`` dealt into at most ``streams`` parts of about equal work (images to run),
    keeping queries that share a reference in one part (its trunk pass then runs once); each part in
    query order. Longest-first onto the lightest part."""
    by_ref: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(queries):
        by_ref[q.reference.key].append(i)
    buckets = sorted(by_ref.values(), key=lambda idx: -sum(queries[i].pairs for i in idx))
    parts: list[list[int]] = [[] for _ in range(min(streams, len(buckets)))]
    load = [0] * len(parts)
    for idx in buckets:
        k = load.index(min(load))
        parts[k] += idx
        load[k] += 1 + sum(queries[i].pairs for i in idx)
    return [sorted(p) for p in parts if p]


def _forward(trunk: Trunk, x: Tensor, dtype: torch.dtype) -> Features:
    """Normalised float32 features of ``x`` ``[N, 3, H, W]``: the trunk under autocast to ``dtype``
    (none for float32), the normalisation outside it. Inference mode and autocast are per thread, so
    both are entered here (this runs on stream threads too)."""
    autocast: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if dtype != torch.float32:
        autocast = torch.autocast(x.device.type, dtype=dtype)
    with torch.inference_mode():
        with autocast:
            raw = trunk(x)
        return [normalize(f) for f in raw]


def _to_host(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` (float32) on the CPU with one device→host copy in all; CPU tensors pass as they are."""
    if all(t.device.type == "cpu" for t in tensors):
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    parts = torch.split(flat, [t.numel() for t in tensors])
    return [p.view(t.shape) for p, t in zip(parts, tensors, strict=True)]


def _answers(
    queries: Sequence[Query], groups: list[tuple[list[int], DistanceResult]]
) -> list[Answer]:
    """Split each group's results (query indices, device results) into per-query answers, in query
    order, after one host copy for the whole batch."""
    flat: list[Tensor] = []
    for _, res in groups:
        flat += [res.total, res.per_layer] + ([] if res.spatial is None else [res.spatial])
    host = iter(_to_host(flat))
    out: list[Answer | None] = [None] * len(queries)
    for idx, res in groups:
        totals, layers = next(host).tolist(), next(host).tolist()
        spatial = None if res.spatial is None else next(host)
        start = s_start = 0
        for i in idx:
            q = queries[i]
            maps = None
            if q.spatial and spatial is not None:
                maps = list(spatial[s_start : s_start + q.pairs])
                s_start += q.pairs
            out[i] = Answer(totals[start : start + q.pairs], layers[start : start + q.pairs], maps)
            start += q.pairs
    return [a for a in out if a is not None]
