"""The model engine: batched == unbatched == the plain metric, one trunk pass per distinct image, cache."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from app.imaging import load_tensor
from app.metric.engine import Engine, FeatureCache, deal
from app.metric.queries import Image, Query, content_key
from app.metric.store import ModelStore

RES = 64
MODELS = ["lpips-alex", "lpips-squeeze"]


class Counts:
    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.pairs: dict[str, int] = {}

    def cache_lookup(self, hit: bool) -> None:
        self.hits += hit
        self.misses += not hit

    def pairs_done(self, model: str, pairs: int) -> None:
        self.pairs[model] = self.pairs.get(model, 0) + pairs


@pytest.fixture(scope="module")
def images(images_dir: Path) -> list[Image]:
    files = sorted((images_dir / "imagenet-sample").glob("*.JPEG"))[:6]
    out = []
    for f in files:
        data = f.read_bytes()
        out.append(Image(load_tensor(data, RES), content_key(data)))
    return out


@pytest.fixture(scope="module")
def engine(store: ModelStore) -> Engine:
    e = Engine(store, MODELS, torch.device("cpu"), RES)
    e.load()
    e.warmup()
    return e


def trunk_batch_sizes(engine: Engine) -> tuple[list[int], list[torch.utils.hooks.RemovableHandle]]:
    seen: list[int] = []
    handles = [
        t.register_forward_hook(lambda _m, args, _o: seen.append(int(args[0].shape[0])))
        for t in engine.trunks.values()
    ]
    return seen, handles


def test_models_share_nothing_but_what_they_should(engine: Engine) -> None:
    assert set(engine.trunks) == {"alexnet-imagenet", "squeezenet1_1-imagenet"}
    assert engine.metric("lpips-alex").trunk is engine.trunks["alexnet-imagenet"]


def test_batched_equals_unbatched_equals_plain_metric(
    engine: Engine, store: ModelStore, images: list[Image]
) -> None:
    a, b, c, d, e, f = images
    queries = [
        Query("lpips-alex", a, (b, c, d)),
        Query("lpips-squeeze", a, (e,)),
        Query("lpips-alex", e, (f, a, f), spatial=True),  # duplicate candidate in one request
        Query("lpips-alex", a, (c,)),  # same reference as the first request
    ]
    batched = engine.compute(queries, use_cache=False)
    alone = [engine.compute([q], use_cache=False)[0] for q in queries]
    for q, got, single in zip(queries, batched, alone, strict=True):
        metric = store.load(q.model)
        x0 = q.reference.tensor[None].expand(q.pairs, -1, -1, -1)
        x1 = torch.stack([c.tensor for c in q.candidates])
        with torch.inference_mode():
            ref = metric.compare(x0, x1, spatial=q.spatial)
        torch.testing.assert_close(torch.tensor(got.distances), ref.total, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(got.per_layer), ref.per_layer, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            torch.tensor(got.distances), torch.tensor(single.distances), atol=1e-5, rtol=1e-5
        )
        if q.spatial:
            assert got.spatial is not None and ref.spatial is not None
            torch.testing.assert_close(torch.stack(got.spatial), ref.spatial, atol=1e-5, rtol=1e-4)
        else:
            assert got.spatial is None
    assert batched[2].distances[0] == pytest.approx(batched[2].distances[2], abs=1e-6)
    assert min(batched[0].distances) > 0.05  # different ImageNet photos are far apart


def test_one_trunk_pass_per_distinct_image(engine: Engine, images: list[Image]) -> None:
    a, b, c, d, _, _ = images
    seen, handles = trunk_batch_sizes(engine)
    try:
        engine.compute(
            [
                Query("lpips-alex", a, (b, c)),
                Query("lpips-alex", a, (c, d)),
                Query("lpips-alex", b, (a,)),
            ],
            use_cache=False,
        )
    finally:
        for h in handles:
            h.remove()
    assert seen == [4]  # a, b, c, d once each, one forward for the whole batch


def test_reference_cache_skips_the_reference_pass(store: ModelStore, images: list[Image]) -> None:
    counts = Counts()
    engine = Engine(
        store, ["lpips-alex"], torch.device("cpu"), RES, FeatureCache(8, 1 << 30), counts
    )
    engine.load()
    a, b, c, _, _, _ = images
    first = engine([Query("lpips-alex", a, (b,))])
    seen, handles = trunk_batch_sizes(engine)
    try:
        second = engine([Query("lpips-alex", a, (b,)), Query("lpips-alex", a, (c,))])
    finally:
        for h in handles:
            h.remove()
    assert seen == [2]  # only b and c: a came from the cache
    assert (counts.hits, counts.misses) == (1, 1)
    assert second[0].distances == pytest.approx(first[0].distances, abs=1e-6)
    assert counts.pairs == {"lpips-alex": 3}
    assert len(engine.cache) == 1


def test_cache_is_bounded_by_entries_and_bytes() -> None:
    one = [torch.zeros(1, 4, 2, 2)]  # 64 bytes
    cache = FeatureCache(max_entries=2, max_bytes=1000)
    for k in "abc":
        cache.put((k, "t", (2, 2)), [f.clone() for f in one])
    assert len(cache) == 2 and cache.get(("a", "t", (2, 2))) is None
    assert cache.get(("b", "t", (2, 2))) is not None  # b becomes most recent
    cache.put(("d", "t", (2, 2)), [f.clone() for f in one])
    assert cache.get(("c", "t", (2, 2))) is None and cache.get(("b", "t", (2, 2))) is not None
    small = FeatureCache(max_entries=100, max_bytes=150)
    for k in "abc":
        small.put((k, "t", (2, 2)), [f.clone() for f in one])
    assert len(small) == 2 and small.bytes == 128


def test_concurrent_streams_give_the_same_answers(
    store: ModelStore, engine: Engine, images: list[Image]
) -> None:
    streamed = Engine(store, ["lpips-alex"], torch.device("cpu"), RES, streams=3)
    streamed.load()
    a, b, c, d, e, f = images
    queries = [Query("lpips-alex", a, (b, c, d)), Query("lpips-alex", e, (f, a), spatial=True)]
    threads: set[str] = set()
    hook = streamed.trunks["alexnet-imagenet"].register_forward_hook(
        lambda *_: threads.add(threading.current_thread().name)
    )
    try:
        got = streamed.compute(queries, use_cache=False)
    finally:
        hook.remove()
    want = engine.compute(queries, use_cache=False)
    assert len(threads) == 3 and all(t.startswith("rlpips-stream") for t in threads)
    for g, w in zip(got, want, strict=True):
        assert g.distances == pytest.approx(w.distances, abs=1e-5)
        torch.testing.assert_close(torch.tensor(g.per_layer), torch.tensor(w.per_layer))
    assert got[1].spatial is not None and want[1].spatial is not None
    torch.testing.assert_close(torch.stack(got[1].spatial), torch.stack(want[1].spatial))


def test_inference_mode_stays_local(engine: Engine, images: list[Image]) -> None:
    engine.compute([Query("lpips-alex", images[0], (images[1],))])
    assert not torch.is_inference_mode_enabled()
    assert torch.is_grad_enabled()


def test_unknown_model_is_refused(engine: Engine, images: list[Image]) -> None:
    with pytest.raises(KeyError, match="lpips-vgg"):
        engine.compute([Query("lpips-vgg", images[0], (images[1],))])


def test_channels_last_layout_gives_the_same_answers(
    store: ModelStore, engine: Engine, images: list[Image]
) -> None:
    """The default layout (channels-last weights and inputs) against contiguous NCHW, and the layout
    really reaches the trunk (weights and the batch it sees)."""
    flat = Engine(store, MODELS, torch.device("cpu"), RES, channels_last=False)
    flat.load()
    a, b, c, d, e, _ = images
    queries = [
        Query("lpips-alex", a, (b, c)),
        Query("lpips-squeeze", d, (e,), spatial=True),
    ]
    layouts: list[bool] = []
    hooks = [
        t.register_forward_pre_hook(
            lambda _m, args: layouts.append(
                args[0].is_contiguous(memory_format=torch.channels_last)
                and not args[0].is_contiguous()
            )
        )
        for t in (*engine.trunks.values(), *flat.trunks.values())
    ]
    try:
        got = engine.compute(queries, use_cache=False)
        want = flat.compute(queries, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert engine.channels_last and layouts == [True, True, False, False]
    conv = engine.trunks["alexnet-imagenet"].features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for g, w in zip(got, want, strict=True):
        assert g.distances == pytest.approx(w.distances, abs=1e-5)
        torch.testing.assert_close(torch.tensor(g.per_layer), torch.tensor(w.per_layer))
    assert got[1].spatial is not None and want[1].spatial is not None
    torch.testing.assert_close(torch.stack(got[1].spatial), torch.stack(want[1].spatial))


def test_deal_balances_work_and_keeps_shared_references_together(images: list[Image]) -> None:
    a, b, c, d, e, f = images
    queries = [
        Query("lpips-alex", a, (b,)),
        Query("lpips-alex", c, (d, e, f)),
        Query("lpips-squeeze", a, (c,)),
        Query("lpips-alex", e, (a,)),
        Query("lpips-alex", f, (b,)),
    ]
    # by reference, most pairs first, onto the lighter part (1 + pairs images each):
    # c (4 images) -> part 0; a (2 queries, 3 images) -> part 1; e (2) -> part 1; f (2) -> part 0
    assert deal(queries, 2) == [[1, 4], [0, 2, 3]]
    assert deal(queries, 9) == [[1], [0, 2], [3], [4]]  # never more parts than references
    assert deal(queries[:1], 4) == [[0]]


def test_dealt_batches_give_the_unstreamed_answers(
    store: ModelStore, engine: Engine, images: list[Image]
) -> None:
    streamed = Engine(store, MODELS, torch.device("cpu"), RES, streams=2)
    streamed.load()
    a, b, c, d, e, f = images
    queries = [
        Query("lpips-alex", a, (b, c)),
        Query("lpips-squeeze", a, (d,), spatial=True),
        Query("lpips-alex", e, (f, a)),
        Query("lpips-squeeze", c, (e,)),
    ]
    calls: list[tuple[str, int]] = []
    hooks = [
        t.register_forward_hook(
            lambda _m, args, _o: calls.append((threading.current_thread().name, args[0].shape[0]))
        )
        for t in streamed.trunks.values()
    ]
    try:
        got = streamed.compute(queries, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    want = engine.compute(queries, use_cache=False)
    assert {name for name, _ in calls} == {"rlpips-stream_0", "rlpips-stream_1"}
    # parts [q0, q1] and [q2, q3]: alex a,b,c and squeeze a,d; alex e,f,a and squeeze c,e
    assert sorted(n for _, n in calls) == [2, 2, 3, 3]
    for g, w in zip(got, want, strict=True):
        assert g.distances == pytest.approx(w.distances, abs=1e-5)
        torch.testing.assert_close(torch.tensor(g.per_layer), torch.tensor(w.per_layer))
    assert got[1].spatial is not None and want[1].spatial is not None
    torch.testing.assert_close(torch.stack(got[1].spatial), torch.stack(want[1].spatial))
