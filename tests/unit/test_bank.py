"""The bank's core without HTTP: the embedding's squared L2 distance is a lower bound of the true
LPIPS distance (both models, several grids, unequal cells), and the SQLite + FAISS storage (range
search against brute force, idempotent upserts, reopening rebuilds the index, searches during inserts)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from app.bank.base import BankNotFound, BankSpec, NewItem
from app.bank.embedding import dimension, embed, radius
from app.bank.storage import SqliteFaissStorage
from app.imaging import load_tensor
from app.metric.engine import Engine
from app.metric.lpips import distance_from_features
from app.metric.queries import Image
from tests.support import IMAGENET
from tests.unit.conftest import BANK_MODELS

MODELS = BANK_MODELS


@pytest.mark.parametrize("grid", [1, 2, 3, 5])
def test_embedding_distance_is_a_lower_bound_of_lpips(bank_engine: Engine, grid: int) -> None:
    """For every pair of 20 images (natural, near copies, noise), ‖e_x − e_y‖² ≤ LPIPS(x, y) with
    both models; grid 3 and 5 split the 7×7 and 3×3 maps into unequal cells."""
    files = sorted(IMAGENET.glob("*.JPEG"))[:14]
    tensors = [load_tensor(f.read_bytes(), 64) for f in files]
    tensors += [t.flip(-1) for t in tensors[:2]] + [(t * 0.8).clamp(-1, 1) for t in tensors[:2]]
    gen = torch.Generator().manual_seed(grid)
    tensors += [torch.rand(3, 64, 64, generator=gen) * 2 - 1 for _ in range(2)]
    images = [Image(t, f"i{k}") for k, t in enumerate(tensors)]
    n = len(images)
    i0, i1 = torch.triu_indices(n, n, 1)
    for model in MODELS:
        feats = bank_engine.image_features(model, images)
        heads = bank_engine.heads[model]
        e = embed(heads, feats, grid)
        shapes = [(int(f.shape[2]), int(f.shape[3])) for f in feats]
        assert e.shape == (n, dimension(heads, shapes, grid))
        with torch.inference_mode():
            true = distance_from_features(heads, [f[i0] for f in feats], [f[i1] for f in feats])
        bound = ((e[i0] - e[i1]) ** 2).sum(dim=1)
        assert bool((bound <= true.total + 1e-6).all()), float((bound - true.total).max())
        assert float(bound.mean()) > 0.02 * float(true.total.mean())  # not trivially 0
        assert bool((bound <= radius(float(true.total.max()))).all())


def spec(name: str = "b", dim: int = 8) -> BankSpec:
    return BankSpec(name, "lpips-alex", 0.5, 1, 64, dim)


def item(i: str, v: np.ndarray, png: bytes = b"png") -> NewItem:
    return NewItem(i, f"digest-{i}-{png!r}", v.astype(np.float32), png)


def test_storage_range_search_matches_brute_force_and_survives_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = SqliteFaissStorage(tmp_path)
    assert store.create(spec()) == (spec(), True)
    assert store.create(spec()) == (spec(), False)
    vecs = rng.normal(size=(300, 8)).astype(np.float32) * 0.5
    ids = [f"i{k}" for k in range(300)]
    statuses = store.upsert("b", [item(i, v) for i, v in zip(ids, vecs, strict=True)])
    assert statuses == ["added"] * 300
    assert store.upsert("b", [item("i0", vecs[0]), item("i1", vecs[0], b"other")]) == [
        "unchanged",
        "replaced",
    ]
    vecs[1] = vecs[0]
    assert store.remove("b", "i2") and not store.remove("b", "i2")
    keep = np.ones(300, bool)
    keep[2] = False
    queries = rng.normal(size=(2, 8)).astype(np.float32) * 0.5

    def brute(r: float, rows: slice = slice(None)) -> dict[str, float]:
        d = ((vecs[None] - queries[rows, None]) ** 2).sum(-1).min(0)
        return {ids[k]: float(d[k]) for k in range(300) if keep[k] and d[k] < r}

    for r in (0.5, 1.5, 3.0):
        n, top = store.candidates("b", queries, r, 1000)
        got = dict(top)
        want = brute(r)
        assert n == len(want) and set(got) == set(want) and len(want) > 0
        assert [b for _, b in top] == sorted(b for _, b in top)
        n3, top3 = store.candidates("b", queries[:1], r, 3)
        first = sorted(brute(r, slice(0, 1)).items(), key=lambda kv: kv[1])
        assert n3 == len(first) and [i for i, _ in top3] == [i for i, _ in first[:3]]
        assert all(abs(got[k] - want[k]) < 1e-4 for k in want)
    info = store.info("b")
    assert info is not None and info.items == 299
    store.close()
    again = SqliteFaissStorage(tmp_path)  # a new process would do the same
    assert again.info("b") == info
    assert dict(again.candidates("b", queries, 1.5, 1000)[1]).keys() == brute(1.5).keys()
    assert again.images("b", ["i1", "i2"]) == {"i1": b"other"}
    assert again.drop("b") and again.info("b") is None
    with pytest.raises(BankNotFound):
        again.candidates("b", queries, 1.0, 10)
    again.close()


def test_searches_run_while_items_are_inserted(tmp_path: Path) -> None:
    """Readers on other threads during a stream of inserts: no errors, and the count they see only
    grows (each acknowledged batch is visible to every later search)."""
    store = SqliteFaissStorage(tmp_path)
    store.create(spec(dim=4))
    rng = np.random.default_rng(1)
    stop = threading.Event()
    seen: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def reader(mine: list[int]) -> None:
        try:
            while not stop.is_set():
                mine.append(store.candidates("b", np.zeros((1, 4), np.float32), 1e9, 1)[0])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    for batch in range(40):
        v = rng.normal(size=(5, 4))
        store.upsert("b", [item(f"{batch}-{k}", v[k]) for k in range(5)])
        assert store.candidates("b", np.zeros((1, 4), np.float32), 1e9, 1)[0] == 5 * (batch + 1)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and all(len(m) > 5 and m == sorted(m) for m in seen)
    store.close()


def test_a_replica_on_the_same_file_sees_changes_after_refresh(tmp_path: Path) -> None:
    """Two storages on one SQLite file (two service replicas on one volume): what one writes, the
    other's index holds after its next ``refresh`` (adds, replacements, removals, drops, re-creates)."""
    a, b = SqliteFaissStorage(tmp_path), SqliteFaissStorage(tmp_path)
    z = np.zeros((1, 4), np.float32)
    a.create(spec(dim=4))
    assert b.info("b") is None and b.refresh() == 1 and b.info("b") is not None
    a.upsert("b", [item("x", np.ones(4)), item("y", np.full(4, 2.0))])
    assert b.candidates("b", z, 1e9, 10)[0] == 0
    b.refresh()
    assert b.candidates("b", z, 1e9, 10) == a.candidates("b", z, 1e9, 10)
    a.upsert("b", [item("x", np.full(4, 3.0), b"new")])  # replaced
    a.remove("b", "y")
    b.refresh()
    assert b.candidates("b", z, 1e9, 10) == (1, [("x", 36.0)])
    assert b.info("b") == a.info("b")
    b.upsert("b", [item("w", np.ones(4))])  # the other way round, and idempotent on its own writes
    a.refresh()
    assert b.refresh() >= 1 and a.info("b") == b.info("b") and a.info("b").items == 2  # type: ignore[union-attr]
    a.drop("b")
    a.create(spec(dim=4))
    a.upsert("b", [item("v", np.ones(4))])
    b.refresh()
    assert b.candidates("b", z, 1e9, 10) == a.candidates("b", z, 1e9, 10)
    assert b.candidates("b", z, 1e9, 10)[0] == 1
    a.close()
    b.close()
