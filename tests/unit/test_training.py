"""2AFC data, adversarial training and evaluation, and the shipped robust heads."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli.main import main
from app.imaging import to_signed
from app.metric.lpips import LPIPS
from app.metric.store import ModelStore
from app.training import distortions
from app.training.datasets import (
    OBJECTIVE,
    TEACHER,
    SynthConfig,
    TripletSet,
    generate,
    read_bapps,
    split_sources,
)
from app.training.evaluate import TwoAFCAttack, evaluate
from app.training.model import load_metric
from app.training.train import TrainConfig, Trainer, export

SHIPPED = "r-lpips-alex-linf-synth"
TINY = (48, 12, 24)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny batches run fastest (and steadiest on a shared machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lpips(store: ModelStore) -> LPIPS:
    return store.load("lpips-alex")


@pytest.fixture(scope="module")
def tiny_cfg(images_dir: Path) -> SynthConfig:
    return SynthConfig(str(images_dir / "imagenet-sample"), seed=3, sizes=TINY)


@pytest.fixture(scope="module")
def tiny(tiny_cfg: SynthConfig, lpips: LPIPS) -> dict[str, TripletSet]:
    return {s: generate(tiny_cfg, s, lpips) for s in ("train", "val", "test")}


# -- data ----------------------------------------------------------------------------------------


def write_bapps(root: Path, n: int, size: int = 64) -> list[float]:
    rng = np.random.default_rng(0)
    judges = [0.0, 0.25, 1.0, 0.6][:n]
    for sub in ("ref", "p0", "p1", "judge"):
        (root / sub).mkdir(parents=True)
    for i, h in enumerate(judges):
        for sub in ("ref", "p0", "p1"):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / sub / f"{i:06d}.png")
        np.save(root / "judge" / f"{i:06d}.npy", np.array([h], dtype=np.float32))
    return judges


def test_bapps_reader(tmp_path: Path) -> None:
    judges = write_bapps(tmp_path / "traditional", 4)
    data = read_bapps([tmp_path / "traditional"])
    assert len(data) == 4 and data.ref.shape == (4, 3, 64, 64) and data.ref.dtype == torch.uint8
    assert data.h.tolist() == pytest.approx(judges)
    first = np.array(Image.open(tmp_path / "traditional" / "p1" / "000000.png"))
    assert torch.equal(data.p1[0], torch.from_numpy(first).permute(2, 0, 1))
    assert data.names[2] == "traditional/000002" and bool((data.kind == 2).all())
    assert read_bapps([tmp_path / "traditional"], size=32, limit=3).p0.shape == (3, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="BAPPS"):
        read_bapps([tmp_path])


def test_splits_are_disjoint_by_source(tiny: dict[str, TripletSet]) -> None:
    parts = split_sources(1000, 3, (0.8, 0.1, 0.1))
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == list(range(1000))
    assert (len(parts["train"]), len(parts["val"]), len(parts["test"])) == (800, 100, 100)
    used = {s: set(d.source.tolist()) for s, d in tiny.items()}
    assert not (used["train"] & used["val"]) and not (used["train"] & used["test"])
    assert not (used["val"] & used["test"])
    for s in tiny:
        assert used[s] <= set(parts[s])


def test_generator_shapes_and_determinism(
    tiny: dict[str, TripletSet], tiny_cfg: SynthConfig, lpips: LPIPS
) -> None:
    test = tiny["test"]
    assert test.ref.shape == (len(test), 3, 64, 64) and test.p0.dtype == torch.uint8
    assert len(test) >= TINY[2] - 3  # a teacher slot may be dropped when no candidate is confident
    assert {OBJECTIVE, TEACHER} == set(test.kind.tolist())
    again = generate(tiny_cfg, "test", lpips)
    for name in ("ref", "p0", "p1", "h", "kind", "source", "severity"):
        assert torch.equal(getattr(test, name), getattr(again, name)), name
    other = generate(SynthConfig(tiny_cfg.images_dir, seed=4, sizes=TINY), "test", lpips)
    assert not torch.equal(other.ref[:5], test.ref[:5])


def test_same_distortion_labels_are_objective(tiny: dict[str, TripletSet]) -> None:
    """Objective triplets: one distortion draw at two severities ≥ gap apart; the milder one wins."""
    for d in tiny.values():
        obj = d.kind == OBJECTIVE
        t0, t1 = d.severity[obj, 0], d.severity[obj, 1]
        assert torch.equal(d.h[obj], (t1 < t0).float())
        assert bool(((t0 - t1).abs() >= 0.3 - 1e-6).all())


def test_teacher_labels_follow_lpips_with_margin(tiny: dict[str, TripletSet], lpips: LPIPS) -> None:
    d = tiny["train"].subset(torch.nonzero(tiny["train"].kind == TEACHER).flatten())
    ref, p0, p1 = (to_signed(x) for x in d.images())
    with torch.no_grad():
        d0, d1 = lpips(ref, p0), lpips(ref, p1)
    assert torch.equal(d.h, (d1 < d0).float())
    assert bool(((d0 - d1).abs() / torch.maximum(d0, d1) >= 0.2 - 1e-4).all())


@pytest.mark.parametrize("name", sorted(distortions.DISTORTIONS))
def test_distortions_grow_with_severity(name: str, tiny: dict[str, TripletSet]) -> None:
    """For a fixed draw, a higher severity is farther from the original (mean absolute error)."""
    x = tiny["val"].ref[0].float() / 255
    for seed in range(3):
        d = distortions.DISTORTIONS[name](np.random.default_rng(seed), (64, 64))
        err = [float((d(x, t).clamp(0, 1) - x).abs().mean()) for t in (0.0, 0.35, 0.7, 1.0)]
        assert err == sorted(err) and err[0] > 0, (name, seed, err)


# -- training ------------------------------------------------------------------------------------


def test_smoke_training_loss_decreases(
    tiny: dict[str, TripletSet], store: ModelStore, tmp_path: Path
) -> None:
    cfg = TrainConfig(attack_steps=1, lr=3e-3, batch_size=16, epochs=5, epochs_decay=1, seed=1)
    trainer = Trainer(cfg, tiny["train"], tmp_path / "run", progress=False)
    model = trainer.run(store.load_trunk("lpips-alex"))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6
    assert log[-1]["loss"] < log[0]["loss"] - 0.02, [r["loss"] for r in log]
    assert all(bool((w >= 0).all()) for w in model.metric.heads.weights)


def test_resume_reproduces_an_uninterrupted_run(
    tiny: dict[str, TripletSet], store: ModelStore, tmp_path: Path
) -> None:
    cfg = TrainConfig(attack_steps=1, lr=1e-3, batch_size=8, epochs=1, epochs_decay=1, seed=2)
    trunk = store.load_trunk("lpips-alex")
    data = tiny["train"].subset(range(16))
    straight = Trainer(cfg, data, tmp_path / "a", progress=False).run(trunk)

    def crash(epoch: int, _: object) -> dict[str, float]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, data, tmp_path / "b", progress=False, on_epoch=crash).run(trunk)
    resumed = Trainer(cfg, data, tmp_path / "b", progress=False).run(trunk)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_tune_mode_trains_and_exports_the_trunk(
    tiny: dict[str, TripletSet], store: ModelStore, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        mode="tune", attack="p0+p1", attack_steps=1, lr=1e-3, batch_size=8, epochs=1, epochs_decay=0
    )
    trunk = store.load_trunk("lpips-alex")
    before = trunk.features[0].weight.detach().clone()
    model = Trainer(cfg, tiny["train"].subset(range(8)), tmp_path, progress=False).run(trunk)
    assert not torch.equal(model.metric.trunk.features[0].weight, before)
    export(model, tmp_path / "tune.safetensors", {})
    loaded = load_metric(str(tmp_path / "tune.safetensors"), store)
    torch.testing.assert_close(
        loaded.trunk.features[0].weight, model.metric.trunk.features[0].weight
    )


def test_train_and_evaluate_cli(tmp_path: Path, images_dir: Path) -> None:
    common = ["--images-dir", str(images_dir / "imagenet-sample"), "--synth-sizes", "16,4,8",
              "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", *common, "--out", str(out), "--epochs", "1", "--epochs-decay", "0",
                 "--attack-steps", "1", "--val-limit", "0", "--no-progress"]) == 0  # fmt: skip
    assert (out / "heads.safetensors").is_file() and (tmp_path / "cache").is_dir()
    report = tmp_path / "eval.json"
    assert main(["evaluate", "2afc", *common, "--models", "lpips-alex", str(out / "heads.safetensors"),
                 "--steps", "3", "--json", str(report), "--markdown", str(tmp_path / "t.md")]) == 0  # fmt: skip
    results = json.loads(report.read_text())["results"]
    assert set(results) == {"lpips-alex", str(out / "heads.safetensors")}
    for r in results.values():
        assert 0 <= r["adversarial"] <= r["clean"] <= 1
    assert "`lpips-alex`" in (tmp_path / "t.md").read_text()


# -- evaluation ----------------------------------------------------------------------------------


def test_attack_lowers_lpips_2afc_accuracy(tiny: dict[str, TripletSet], lpips: LPIPS) -> None:
    scores = evaluate(lpips, tiny["val"], TwoAFCAttack(steps=5))
    assert scores.clean.shape == (len(tiny["val"]),)
    assert bool((scores.adversarial <= scores.clean).all())
    assert scores.summary["adversarial"] < scores.summary["clean"] - 0.2
    clean_only = evaluate(lpips, tiny["val"], TwoAFCAttack(steps=0))
    assert torch.equal(clean_only.clean, scores.clean)


# -- the shipped model ---------------------------------------------------------------------------


def card_accuracy(card: str) -> tuple[int, float]:
    m = re.search(r"clean 2AFC accuracy on the first (\d+) test triplets: \*\*([0-9.]+)\*\*", card)
    assert m, "the model card must state the clean accuracy on the fixed test subset"
    return int(m.group(1)), float(m.group(2))


def test_shipped_heads_reproduce_the_model_card(
    store: ModelStore, images_dir: Path, lpips: LPIPS
) -> None:
    heads = store.load_heads(SHIPPED)
    assert all(bool((w >= 0).all()) for w in heads.weights)
    assert store.model(SHIPPED).trunk.file == store.model("lpips-alex").trunk.file
    n, expected = card_accuracy((store.root / store.model(SHIPPED).card).read_text())
    # The card measures `--limit N` of the default test split; generation is patch-major with
    # per-(source, patch) seeds, so those N triplets are exactly the test split of size N.
    cfg = SynthConfig(str(images_dir / "imagenet-sample"), sizes=(0, 0, n))
    data = generate(cfg, "test", lpips)
    metric = load_metric(SHIPPED, store)
    acc = evaluate(metric, data, TwoAFCAttack(steps=0)).summary["clean"]
    assert acc == pytest.approx(expected, abs=5e-5)
