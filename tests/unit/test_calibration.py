"""Threshold calibration at a false-match rate: the rule, and the CLI writing the store's manifest."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from app.cli.main import main
from app.evaluation.data import calibration_files, eval_files, training_files
from app.evaluation.neardup import threshold_at_fmr
from app.metric.store import ModelStore

ROOT = Path(__file__).resolve().parents[2]


def test_threshold_admits_at_most_the_stated_share_of_unrelated_pairs() -> None:
    neg = torch.tensor([0.9, 0.3, 0.5, 0.31, 0.7] * 40, dtype=torch.float64)  # 40 of 200 at 0.3
    for fmr, allowed in ((1e-3, 0), (0.2, 40), (0.21, 40), (0.4, 80)):
        t = threshold_at_fmr(neg, fmr)
        assert int((neg <= t).sum()) == allowed <= math.floor(fmr * len(neg))
        assert int((neg <= math.nextafter(t, 1)).sum()) > allowed  # the largest such threshold


def test_calibration_images_are_neither_trained_on_nor_evaluated(images_dir: Path) -> None:
    imagenet = images_dir / "imagenet-sample"
    cal = set(calibration_files(imagenet))
    assert len(cal) == 100
    assert not cal & set(eval_files(imagenet, None))
    assert cal <= set(
        training_files(imagenet)
    )  # the val split: chose the shipped lr, never trained


def test_cli_calibrates_and_writes_the_manifest(
    images_dir: Path,
    weights_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store_dir = tmp_path / "store"
    shutil.copytree(ROOT / "model_store", store_dir, ignore=shutil.ignore_patterns("files"))
    monkeypatch.setenv("RLPIPS_WEIGHTS_DIR", str(weights_dir))
    monkeypatch.setenv("RLPIPS_MODEL_STORE", str(store_dir))
    out = tmp_path / "t.json"
    argv = ["evaluate", "thresholds", "--models", "lpips-alex", "lpips-vgg", "--views", "2",
            "--resolution", "64", "--fmr", "1e-3", "--images", str(images_dir / "imagenet-sample"),
            "--out", str(out), "--write-manifest"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())["models"]
    alex = report["lpips-alex"]
    assert alex["pairs"] == 200 * 199 // 2 - 100  # 2 views of 100 images, never two of one source
    assert alex["false_matches"] <= math.floor(1e-3 * alex["pairs"])
    nxt = alex["first_excluded"]  # the threshold is the largest (to 4 decimals) below it
    assert alex["threshold"] < nxt <= alex["threshold"] + 1e-4 + 1e-6
    assert alex["smallest_unrelated"][0] <= nxt
    assert "skipped" in report["lpips-vgg"]  # no VGG trunk offline: reported, not dropped
    entry = ModelStore(store_dir).model("lpips-alex")
    assert entry.threshold == alex["threshold"]
    assert entry.calibration is not None and entry.calibration.pairs == alex["pairs"]
    assert ModelStore(store_dir).model("lpips-vgg").calibration is None
