"""The serving shape on the CPU: one replica using every core against several single-core replicas
(issue 15 item 3), then the engine's raw throughput, in one run.

    python -m benchmarks.replicas_cpu [--rounds 2] [--duration 20] [--out docs/benchmarks/cpu-replicas-256.json]

256², cache off, 32 connections from 2 load-generator processes (spread over the replicas), real ImageNet
JPEG uploads; the two shapes alternate for ``--rounds`` rounds. Single-core replicas run with one trunk
stream, one intra-op thread and two decode threads each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.gpu_service import _level, _server, _wait_ready

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLPIPS_SHARED_DIR") or ROOT.parent / "shared")


def _shape(k: int, settings: dict[str, str], seconds: float, logs: Path) -> dict[str, Any]:
    env = {"RLPIPS_WEIGHTS_DIR": str(SHARED / "weights")}
    with ExitStack() as stack:
        servers = [
            stack.enter_context(_server(env, settings, logs / f"replicas-{k}-{i}.log"))
            for i in range(k)
        ]
        _wait_ready(servers)
        return {"replicas": k, **_level([u for u, _ in servers], env, 2, 32, seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        base = {
            "RLPIPS_WEIGHTS_DIR": str(SHARED / "weights"),
            "RLPIPS_DEVICE": "cpu",
            "RLPIPS_RESOLUTION": "256",
            "RLPIPS_CACHE_ENTRIES": "0",
            "RLPIPS_DATA_DIR": str(logs / "data"),
        }
        single = base | {
            "RLPIPS_CPU_STREAMS": "1",
            "RLPIPS_TORCH_THREADS": "1",
            "RLPIPS_DECODE_THREADS": "2",
        }
        report: dict[str, Any] = {"command": " ".join(sys.argv), "cores": cores,
                                  "load_before": os.getloadavg(), "runs": []}  # fmt: skip
        for r in range(args.rounds):
            for k, settings in ((1, base), (cores, single)):
                run = {"round": r, **_shape(k, settings, args.duration, logs)}
                report["runs"].append(run)
                print(json.dumps(run), flush=True)
    report["load_after"] = os.getloadavg()
    raw = subprocess.run(
        [sys.executable, "-m", "benchmarks.raw", "--resolution", "256", "--batch", "32",
         "--duration", str(args.duration)],
        cwd=ROOT, env=os.environ | {"RLPIPS_WEIGHTS_DIR": str(SHARED / "weights")},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report["raw"] = [json.loads(line) for line in raw.stdout.splitlines() if line.startswith("{")]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
