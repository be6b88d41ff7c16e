"""``rlpips robustness`` and ``rlpips evaluate imagenet-attack`` end to end (tiny images, few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli.main import main
from app.imaging import decode

KODAK = "kodak24/kodim{:02d}.png"


def test_robustness_json(
    images_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = str(images_dir / KODAK.format(1))
    cand = str(images_dir / KODAK.format(2))
    out = tmp_path / "adv.png"
    argv = [
        "robustness", ref, cand, "--models", "lpips-alex,lpips-squeeze", "--attack", "l2",
        "--epsilon", "0.5", "--steps", "3", "--goal", "impersonate", "--seed", "3",
        "--resolution", "48", "--save-adversarial", str(out), "--json", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["attack"] == {
        "attack": "l2",
        "epsilon": 0.5,
        "steps": 3,
        "step_size": pytest.approx(2.5 * 0.5 / 3),
        "goal": "impersonate",
        "random_start": True,
        "seed": 3,
    }
    assert body["resolution"] == [48, 48]
    assert [r["model"] for r in body["results"]] == ["lpips-alex", "lpips-squeeze"]
    for r in body["results"]:
        assert r["adversarial_distance"] < r["clean_distance"]
        assert r["perturbation"]["l2"] <= 0.5 + 1e-6
    for name in ("lpips-alex", "lpips-squeeze"):
        img = decode((tmp_path / f"adv-{name}.png").read_bytes())
        assert img.size == (48, 48)


def test_robustness_table_defaults_to_self_attack(
    images_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = str(images_dir / KODAK.format(3))
    assert main(["robustness", ref, "--steps", "2", "--resolution", "32", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("attack linf eps=0.0156863 steps=2")
    row = lines[2].split()
    assert row[0] == "lpips-alex" and float(row[1]) == 0.0 and float(row[2]) > 0.0


def test_robustness_unknown_or_missing_model_is_an_error(
    images_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = str(images_dir / KODAK.format(4))
    assert main(["robustness", ref, "--models", "nope", "--resolution", "32"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["robustness", ref, "--models", "r-lpips-alex-linf-x0", "--resolution", "32"]) == 2
    assert "latest_net_linf_x0.pth" in capsys.readouterr().err


def test_imagenet_attack_writes_summary_and_histogram(
    images_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "docs" / "ia"
    argv = [
        "evaluate", "imagenet-attack", "--limit", "3", "--steps", "2", "--resolution", "32",
        "--batch-size", "2", "--device", "cpu", "--out", str(prefix),
        "--models", "lpips-alex", "lpips-squeeze", "r-lpips-alex-linf-x0", "not-yet-trained",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(prefix.with_suffix(".json").read_text())
    assert summary["images"]["count"] == 3
    assert summary["attack"]["epsilon"] == 0.05 and summary["attack"]["steps"] == 2
    assert set(summary["models"]) == {"lpips-alex", "lpips-squeeze"}
    assert summary["models"]["lpips-alex"]["shares_target_trunk"] is True
    assert summary["models"]["lpips-squeeze"]["shares_target_trunk"] is False
    assert set(summary["skipped"]) == {"r-lpips-alex-linf-x0", "not-yet-trained"}
    alex = summary["models"]["lpips-alex"]
    assert len(summary["distances"]["lpips-alex"]) == 3 and alex["min"] > 0
    assert alex["quantiles"]["0.5"] == pytest.approx(alex["median"])
    assert summary["perturbation"]["max"] <= 0.05 + 1e-6
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "r-lpips-alex-linf-x0         skipped" in out
