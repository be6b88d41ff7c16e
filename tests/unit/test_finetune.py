"""Robust fine-tuning (app.training.robust / finetune): the objective's terms, training, resume, data."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.evaluation.data import eval_files
from app.metric.lpips import LPIPS, Heads
from app.metric.store import ModelStore, WeightsError
from app.metric.trunks import TRUNK_SPECS, Trunk
from app.training.datasets import source_files, split_sources
from app.training.finetune import FineTuner, export, make_student
from app.training.model import load_metric
from app.training.robust import (
    Batch,
    RobustConfig,
    SourcePool,
    adversarial_change,
    balance_penalty,
    draw_batch,
    features,
    geometric_thetas,
    identity_thetas,
    log_gap,
    margin_terms,
    robust_loss,
    train_sources,
    warp,
)

SMALL = RobustConfig(
    steps=4, batch=4, image_size=48, patch=40, lr=1e-3, head_lr=1e-3, attack_steps=1, seed=3
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher() -> LPIPS:
    """A seeded random AlexNet trunk with random non-negative heads (frozen)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trunk = Trunk("alex")
        g = torch.Generator().manual_seed(1)
        heads = Heads(
            [torch.rand(1, c, 1, 1, generator=g) * 0.2 for c in TRUNK_SPECS["alex"].channels]
        )
    return LPIPS(trunk, heads)


@pytest.fixture(scope="module")
def pool() -> SourcePool:
    g = torch.Generator().manual_seed(5)
    images = (torch.rand(6, 3, 8, 8, generator=g) * 255).round().to(torch.uint8)
    images = torch.nn.functional.interpolate(images.float(), size=56, mode="bilinear").round()
    return SourcePool(images.to(torch.uint8), [Path(f"img{i}.png") for i in range(6)])


def test_log_gap_is_zero_only_where_distances_agree() -> None:
    d = torch.tensor([0.1, 0.5, 0.0])
    assert torch.equal(log_gap(d, d), torch.zeros(3))
    assert bool((log_gap(d * 2 + 0.01, d) > 0).all())


def test_balance_penalty_only_punishes_a_dominant_layer() -> None:
    even = torch.full((2, 5), 0.2)
    assert torch.equal(balance_penalty(even, 0.5), torch.zeros(2))
    skewed = torch.tensor([[0.9, 0.05, 0.05, 0.0, 0.0]])
    torch.testing.assert_close(balance_penalty(skewed, 0.5), torch.tensor([0.16]))


def test_margin_terms_vanish_inside_the_margins() -> None:
    pos, neg = margin_terms(torch.tensor([0.1, 0.2]), torch.tensor([0.6, 0.9]), 0.25, 0.45)
    assert float(pos) == 0 and float(neg) == 0
    pos, neg = margin_terms(torch.tensor([0.35]), torch.tensor([0.25]), 0.25, 0.45)
    assert float(pos) == pytest.approx(0.01) and float(neg) == pytest.approx(0.04)


def test_adversarial_change_is_positive_and_zero_without_attack(
    teacher: LPIPS, pool: SourcePool
) -> None:
    y = draw_batch(pool, SMALL, 0).y
    fy = features(teacher, y)
    g = torch.Generator().manual_seed(0)
    d = adversarial_change(teacher, y, fy, SMALL, g)
    assert d.shape == (SMALL.batch,) and bool((d > 0).all())
    none = RobustConfig(attack_steps=0)
    assert torch.equal(adversarial_change(teacher, y, fy, none, g), torch.zeros(SMALL.batch))


def test_student_equal_to_teacher_has_no_distillation_loss(
    teacher: LPIPS, pool: SourcePool
) -> None:
    student = make_student(teacher)
    _, terms = robust_loss(student, teacher, draw_batch(pool, SMALL, 0), SMALL, torch.Generator())
    assert terms["distill"] == 0.0
    assert terms["adv"] > 0 and terms["loss"] >= terms["adv"]


def test_geometric_views_stay_within_the_configured_edits(pool: SourcePool) -> None:
    cfg = RobustConfig(crop=0.2, rotate=5.0, shift=0.03)
    theta = geometric_thetas(256, cfg, torch.Generator().manual_seed(0))
    zoom = theta[:, :, :2].det().abs().sqrt()
    assert bool((zoom >= 0.8 - 1e-6).all()) and bool((zoom <= 1 + 1e-6).all())
    angle = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]).abs())
    assert float(angle.max()) <= 5.0 + 1e-4
    x = pool.unit(torch.arange(2))
    torch.testing.assert_close(warp(x, identity_thetas(2), x.shape[-1]), x)


def test_batches_are_deterministic_and_distinct_sources(pool: SourcePool) -> None:
    a, b = draw_batch(pool, SMALL, 7), draw_batch(pool, SMALL, 7)
    for k in ("x", "y", "a", "b"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert not torch.equal(a.a, draw_batch(pool, SMALL, 8).a)
    assert isinstance(a, Batch) and a.x.shape == (4, 3, 40, 40) and a.a.shape == (4, 3, 48, 48)


def test_training_sources_exclude_evaluation_and_val_images(images_dir: Path) -> None:
    imgs = images_dir / "imagenet-sample"
    train = set(train_sources(imgs))
    files = source_files(imgs)
    assert len(train) == 800
    assert not train & set(eval_files(imgs, images_dir / "kodak24"))
    assert not train & {files[i] for i in split_sources(len(files), 0, (0.8, 0.1, 0.1))["val"]}


def test_a_few_steps_reduce_the_loss(teacher: LPIPS, pool: SourcePool, tmp_path: Path) -> None:
    cfg = RobustConfig(steps=12, batch=4, image_size=48, patch=40, lr=3e-4, head_lr=1e-3,
                       attack_steps=1, w_adv=5.0, decay_from=1.0, seed=1)  # fmt: skip
    batch = draw_batch(pool, cfg, 0)

    def loss_of(model: LPIPS) -> float:
        return robust_loss(model, teacher, batch, cfg, torch.Generator().manual_seed(9))[1]["loss"]

    before = loss_of(make_student(teacher))
    student = FineTuner(cfg, pool, tmp_path, progress=False, log_every=4).run(teacher)
    assert loss_of(student) < 0.8 * before
    assert all(bool((w >= 0).all()) for w in student.heads.weights)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 12]


def test_resume_reproduces_an_uninterrupted_run(
    teacher: LPIPS, pool: SourcePool, tmp_path: Path
) -> None:
    straight = FineTuner(SMALL, pool, tmp_path / "a", progress=False).run(teacher)
    FineTuner(SMALL, pool, tmp_path / "b", progress=False).run(teacher, stop_after=2)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    resumed = FineTuner(SMALL, pool, tmp_path / "b", progress=False).run(teacher)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = RobustConfig(**{**SMALL.__dict__, "w_adv": 2.0})
    with pytest.raises(ValueError, match="different configuration"):
        FineTuner(other, pool, tmp_path / "b", progress=False).run(teacher)


def test_export_carries_trunk_and_heads(
    teacher: LPIPS, pool: SourcePool, store: ModelStore, tmp_path: Path
) -> None:
    student = FineTuner(SMALL, pool, tmp_path, progress=False).run(teacher, stop_after=1)
    assert not torch.equal(student.trunk.features[0].weight, teacher.trunk.features[0].weight)
    export(student, tmp_path / "m.safetensors", {"k": "v"})
    loaded = load_metric(str(tmp_path / "m.safetensors"), store)
    x = pool.unit(torch.arange(2)) * 2 - 1
    y = x.flip(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y), student(x, y))


@pytest.mark.gpu
def test_finetune_on_cuda_matches_the_cpu_start(
    teacher: LPIPS, pool: SourcePool, tmp_path: Path
) -> None:
    """Two steps on the GPU (same data, same CPU-drawn attack starts) stay close to the CPU run."""
    cfg = RobustConfig(**{**SMALL.__dict__, "steps": 2})
    cpu = FineTuner(cfg, pool, tmp_path / "cpu", progress=False).run(teacher)
    gpu = FineTuner(cfg, pool, tmp_path / "gpu", torch.device("cuda", 0), progress=False).run(
        copy.deepcopy(teacher)
    )
    assert next(gpu.parameters()).device.type == "cuda"
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-2, atol=1e-4)


def test_rank_term_uses_objective_triplets_and_is_non_negative(
    teacher: LPIPS, pool: SourcePool
) -> None:
    assert draw_batch(pool, SMALL, 0).right is None  # no 2AFC partners unless the term is on
    cfg = RobustConfig(**{**SMALL.__dict__, "w_rank": 1.0})
    batch = draw_batch(pool, cfg, 0)
    plain = draw_batch(pool, SMALL, 0)
    assert torch.equal(batch.y, plain.y) and torch.equal(batch.a, plain.a)  # other terms' data kept
    assert batch.right is not None and batch.wrong is not None
    assert bool(
        (
            (batch.right == batch.y).flatten(1).all(1) | (batch.wrong == batch.y).flatten(1).all(1)
        ).all()
    )
    err_r = (batch.right - batch.x).abs().mean(dim=(1, 2, 3))
    err_w = (batch.wrong - batch.x).abs().mean(dim=(1, 2, 3))
    assert (
        float((err_r <= err_w).float().mean()) >= 0.75
    )  # milder severity: closer (mostly in pixels)
    student = make_student(teacher)
    _, terms = robust_loss(student, teacher, batch, cfg, torch.Generator().manual_seed(0))
    assert terms["rank"] >= 0
    _, off = robust_loss(student, teacher, plain, SMALL, torch.Generator().manual_seed(0))
    assert off["rank"] == 0.0


def test_store_lists_the_finetuned_model_without_committing_its_weights(
    store: ModelStore, tmp_path: Path
) -> None:
    """The fine-tuned candidate is in the manifest with its own trunk file and a hash; its 9.9 MB
    weights are not in git, so a store without them refuses it, saying how to get them. The default
    is unchanged."""
    name = "r-lpips-alex-tune-linf8"
    assert store.manifest.default == "r-lpips-alex-linf-synth"
    assert store.model(name).trunk.file == name != store.model("lpips-alex").trunk.file
    assert 0 < store.model(name).threshold < 1
    entry = store.manifest.files[name]
    assert entry.url is None and any(d.kind == "sha256" for d in entry.digests)
    assert not (store.root / entry.filename).exists()  # never committed beside the manifest
    bare = ModelStore(store.root, cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="RLPIPS_WEIGHTS_DIR"):
        bare.load(name)


def test_view_adversarial_term_is_off_by_default_and_positive_when_on(
    teacher: LPIPS, pool: SourcePool
) -> None:
    batch = draw_batch(pool, SMALL, 0)
    student = make_student(teacher)
    _, off = robust_loss(student, teacher, batch, SMALL, torch.Generator().manual_seed(0))
    assert off["adv_view"] == 0.0
    on = RobustConfig(**{**SMALL.__dict__, "w_adv_view": 1.0})
    _, terms = robust_loss(student, teacher, batch, on, torch.Generator().manual_seed(0))
    assert terms["adv_view"] > 0 and terms["loss"] > off["loss"]
