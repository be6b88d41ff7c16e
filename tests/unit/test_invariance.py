"""Mirror invariance (``hflip``): the engine's distance is the minimum over the candidate and its mirror
(equal to two plain queries, batched or not, with the winner's per-layer values and heat map), and the
attack objective measures and attacks the same invariant distance. Real LPIPS weights, 64x64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.attacks.robustness import AttackSpec, LPIPSObjective, RobustnessJob, Target
from app.imaging import load_tensor, to_unit
from app.metric.engine import Engine
from app.metric.queries import Image, Query, content_key, expand, mirror
from app.metric.store import ModelStore

RES = 64
MODEL = "lpips-alex"


@pytest.fixture(scope="module")
def images(images_dir: Path) -> list[Image]:
    files = sorted((images_dir / "imagenet-sample").glob("*.JPEG"))[10:14]
    return [Image(load_tensor(f.read_bytes(), RES), content_key(f.read_bytes())) for f in files]


@pytest.fixture(scope="module")
def engine(store: ModelStore) -> Engine:
    e = Engine(store, [MODEL], torch.device("cpu"), RES)
    e.load()
    return e


def test_a_mirrored_copy_is_at_distance_zero_only_with_the_option(
    engine: Engine, images: list[Image]
) -> None:
    ref = images[0]
    flipped = Image(ref.tensor.flip(-1), "uploaded-mirror")
    plain, invariant = engine.compute(
        [Query(MODEL, ref, (flipped,)), Query(MODEL, ref, (flipped,), invariance=("hflip",))]
    )
    assert plain.distances[0] > 0.1 and plain.mirrored is None
    assert invariant.distances[0] == pytest.approx(0.0, abs=1e-6)
    assert invariant.mirrored == [True]


def test_the_invariant_distance_is_the_minimum_of_two_plain_queries(
    engine: Engine, images: list[Image]
) -> None:
    ref, cands = images[0], tuple(images[1:])
    cands += (Image(images[2].tensor.flip(-1), "mirror-of-2"),)  # one the mirror should win
    batch = [
        Query(MODEL, ref, cands, spatial=True, invariance=("hflip",)),
        Query(MODEL, images[1], cands[:1]),  # a plain query in the same batch
    ]
    got, plain_other = engine.compute(batch, use_cache=False)
    direct = engine.compute([Query(MODEL, ref, cands, spatial=True)], use_cache=False)[0]
    mirrors = tuple(mirror(c) for c in cands)
    flipped = engine.compute([Query(MODEL, ref, mirrors, spatial=True)], use_cache=False)[0]
    assert got.spatial is not None and direct.spatial is not None and flipped.spatial is not None
    assert got.mirrored is not None and any(got.mirrored) and not all(got.mirrored)
    for i in range(len(cands)):
        won = flipped.distances[i] < direct.distances[i]
        assert got.mirrored[i] == won
        best = flipped if won else direct
        assert got.distances[i] == pytest.approx(min(direct.distances[i], flipped.distances[i]))
        assert got.per_layer[i] == pytest.approx(best.per_layer[i])
        # the heat map lies over the candidate as uploaded: a mirror's map is flipped back
        expected = best.spatial[i].flip(-1) if won else best.spatial[i]
        torch.testing.assert_close(got.spatial[i], expected)
    alone = engine.compute([Query(MODEL, images[1], cands[:1])], use_cache=False)[0]
    assert plain_other.distances == pytest.approx(alone.distances)


def test_expand_refuses_an_unknown_invariance(images: list[Image]) -> None:
    bad = Query(MODEL, images[0], images[1:2], invariance=("vflip",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vflip"):
        expand(bad)
    q = Query(MODEL, images[0], tuple(images[1:3]), invariance=("hflip",))
    assert q.pairs == 2 and q.work == 4 and expand(q).pairs == 4


def test_the_attack_measures_and_attacks_the_invariant_distance(
    engine: Engine, images: list[Image]
) -> None:
    metric = engine.metric(MODEL)
    ref = to_unit(images[0].tensor[None])
    cand = to_unit(images[0].tensor.flip(-1)[None])  # a mirrored copy: invariant distance 0
    plain = LPIPSObjective(metric, ref).distance(cand)
    invariant = LPIPSObjective(metric, ref, mirror=True).distance(cand)
    assert float(plain) > 0.1 and float(invariant) == pytest.approx(0.0, abs=1e-6)

    spec = AttackSpec("linf", 4 / 255, steps=5, seed=0)
    target = [Target(MODEL, metric, 0.3)]
    result = RobustnessJob(ref, cand, target, spec, mirror=True).results()[0][0]
    assert result.clean_distance == pytest.approx(0.0, abs=1e-6)
    assert result.clean_match
    # the returned image is measured with the same invariant distance, inside the ε-ball
    adv = result.adversarial[None]
    measured = float(LPIPSObjective(metric, ref, mirror=True).distance(adv.double().float()))
    assert result.adversarial_distance == pytest.approx(measured, abs=1e-4)
    assert result.linf <= 4 / 255 + 1e-6
    assert result.adversarial_distance > result.clean_distance
