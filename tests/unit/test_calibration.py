"""Threshold calibration picks the balanced-accuracy optimum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.cli.main import main
from app.training.calibration import best_threshold


def test_separable_sets_give_the_midpoint_of_the_gap() -> None:
    thr, tpr, tnr = best_threshold(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.7]))
    assert thr == pytest.approx(0.4) and tpr == 1.0 and tnr == 1.0


def test_overlapping_sets_maximise_balanced_accuracy() -> None:
    thr, tpr, tnr = best_threshold(torch.tensor([0.1, 0.2, 0.6]), torch.tensor([0.3, 0.8, 0.9]))
    assert 0.2 < thr < 0.3 and tpr == pytest.approx(2 / 3) and tnr == 1.0


def test_cli_calibration_on_a_few_images(
    images_dir: Path,
    weights_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RLPIPS_WEIGHTS_DIR", str(weights_dir))
    out = tmp_path / "t.json"
    argv = [
        "evaluate",
        "thresholds",
        "--models",
        "lpips-alex",
        "lpips-vgg",
        "--limit",
        "6",
        "--resolution",
        "64",
        "--images",
        str(images_dir / "imagenet-sample"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())["models"]
    assert 0 < report["lpips-alex"]["threshold"] < 2
    assert "skipped" in report["lpips-vgg"]  # no VGG trunk offline: reported, not dropped
