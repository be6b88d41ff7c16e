"""``make gpu-check`` as a CPU dry run: the same script, tiny sizes, so it cannot rot between the rare GPU
leases. It must finish every step without an error and write its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def test_gpu_check_dry_run_completes_every_step(weights_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "run", "--dry-run", "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    steps = ("gpu_tests", "parity", "device_decode", "raw", "service", "replicas",
             "replicas_device_decode")  # fmt: skip
    for step in steps:
        assert "error" not in report[step], (step, report[step])
    assert report["gpu_tests"]["returncode"] == 0
    assert "2/" in report["gpu_tests"]["summary"]  # both gpu tests collected
    assert report["parity"]["fp32@native"] == 0.0 and report["parity"]["fp16@native"] < 1e-3
    decode = report["device_decode"]
    assert decode["images"] == 8 and decode["lpips-alex"]["max_abs_diff"] < 3e-3
    assert all(v > 0 for k, v in report["raw"].items() if k.startswith("batch_"))
    level = report["service"]["levels"][0]
    assert level["pairs_per_s"] > 0 and level["errors"] == 0
    for name in ("replicas", "replicas_device_decode"):
        shapes = report[name]["shapes"]
        assert [s["replicas"] for s in shapes] == [1, 2]
        assert all(s["pairs_per_s"] > 0 and s["errors"] == 0 for s in shapes)
    assert report["replicas_device_decode"]["settings"]["RLPIPS_DECODE_DEVICE"] == "device"
    assert (out / "gpu-check.log").stat().st_size > 0
