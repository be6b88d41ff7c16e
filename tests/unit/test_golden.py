"""Published LPIPS values reproduced through the CLI at native size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.main import main
from tests.support import ROOT


def golden_cases(golden: Path) -> list[tuple[str, Path, Path, str, dict[str, float]]]:
    spec = json.loads((golden / "expected.json").read_text())
    cases = []
    ex = spec["lpips_examples"]
    for name, values in ex["pairs"].items():
        for net, v in values.items():
            cases.append(
                (name, golden / ex["reference"], golden / f"lpips_examples/{name}.png", net, v)
            )
    for name, values in spec["tid2013"]["pairs"].items():
        for net, v in values.items():
            cases.append(
                (
                    name,
                    golden / f"tid2013/ref/{name}.bmp",
                    golden / f"tid2013/dist/{name}.bmp",
                    net,
                    v,
                )
            )
    return cases


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(list(argv)) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_all_published_alex_values(
    golden_dir: Path,
    weights_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RLPIPS_WEIGHTS_DIR", str(weights_dir))
    published = [c for c in golden_cases(golden_dir) if c[3] == "alex" and "published" in c[4]]
    assert len(published) == 7
    for name, ref, dist, _, values in published:
        out = run_cli(
            capsys,
            "distance",
            str(ref),
            str(dist),
            "--model",
            "lpips-alex",
            "--resolution",
            "native",
            "--json",
            "--device",
            "cpu",
        )
        assert out["model"] == "lpips-alex"
        assert abs(float(out["distance"]) - values["published"]) < 5e-4, name  # type: ignore[arg-type]
        assert abs(float(out["distance"]) - values["computed"]) < 1e-5, name  # type: ignore[arg-type]
        per_layer = out["per_layer"]
        assert isinstance(per_layer, list) and len(per_layer) == 5
        assert abs(sum(per_layer) - float(out["distance"])) < 1e-5  # type: ignore[arg-type]


def test_computed_squeeze_values(
    golden_dir: Path,
    weights_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RLPIPS_WEIGHTS_DIR", str(weights_dir))
    cases = [c for c in golden_cases(golden_dir) if c[3] == "squeeze"]
    assert len(cases) == 7
    for name, ref, dist, _, values in cases:
        out = run_cli(
            capsys,
            "distance",
            str(ref),
            str(dist),
            "--model",
            "lpips-squeeze",
            "--resolution",
            "native",
            "--json",
            "--device",
            "cpu",
        )
        assert abs(float(out["distance"]) - values["computed"]) < 1e-5, name  # type: ignore[arg-type]
        assert out["resolution"] == ([64, 64] if name.startswith("ex_") else [384, 512])


def test_cli_subprocess_with_spatial_map(
    golden_dir: Path, weights_dir: Path, tmp_path: Path
) -> None:
    """The installed entry point end to end, including the heat map file."""
    heat = tmp_path / "heat.png"
    env = {**os.environ, "RLPIPS_WEIGHTS_DIR": str(weights_dir)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "distance",
            str(golden_dir / "lpips_examples/ex_ref.png"),
            str(golden_dir / "lpips_examples/ex_p1.png"),
            "--resolution",
            "native",
            "--model",
            "lpips-alex",
            "--json",
            "--spatial",
            str(heat),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    assert abs(json.loads(proc.stdout)["distance"] - 0.138) < 5e-4
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_native_size_mismatch_is_a_clear_error(
    golden_dir: Path,
    weights_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RLPIPS_WEIGHTS_DIR", str(weights_dir))
    code = main(
        [
            "distance",
            str(golden_dir / "lpips_examples/ex_ref.png"),
            str(golden_dir / "tid2013/ref/I03.bmp"),
            "--resolution",
            "native",
        ]
    )
    assert code == 2
    assert "differ in size" in capsys.readouterr().err
    out = run_cli(
        capsys,
        "distance",
        str(golden_dir / "lpips_examples/ex_ref.png"),
        str(golden_dir / "tid2013/ref/I03.bmp"),
        "--resolution",
        "64",
        "--json",
    )
    assert out["resolution"] == [64, 64] and float(out["distance"]) > 0  # type: ignore[arg-type]
