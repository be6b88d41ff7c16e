"""Issue 15's CPU targets in one run: the machine's best raw throughput (one single-threaded plain-model
process per core), the engine's raw throughput, and the service end to end — one replica using every
core, and one single-core replica per core — with ratios taken within each round.

    python -m benchmarks.cpu_targets [--rounds 3] [--duration 20] [--out docs/benchmarks/cpu-targets-256.json]

256², ``lpips-alex``, real ImageNet JPEG uploads (~110 KB) for the service from 2 load-generator processes
with 32 connections in all (spread over the replicas), reference cache off. Raw figures run on pre-decoded
tensors: ``independent`` with batch 16 per process, the engine with batch 32 (its CPU streams). The order
of the measurements rotates per round. Targets: engine ≥ 0.95 × independent; service ≥ 0.8 × independent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.gpu_service import _level, _server, _wait_ready

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLPIPS_SHARED_DIR") or ROOT.parent / "shared")
log = logging.getLogger("cpu_targets")


def _raw(args: list[str], duration: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.raw", "--resolution", "256", "--duration",
           str(duration), *args]  # fmt: skip
    env = os.environ | {"RLPIPS_WEIGHTS_DIR": str(SHARED / "weights")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def _service(k: int, settings: dict[str, str], seconds: float, logs: Path) -> dict[str, Any]:
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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cores = len(os.sched_getaffinity(0))
    report: dict[str, Any] = {"command": " ".join(["python -m benchmarks.cpu_targets", *sys.argv[1:]]),
                              "cores": cores, "load_before": os.getloadavg(), "rounds": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        base = {"RLPIPS_DEVICE": "cpu", "RLPIPS_RESOLUTION": "256", "RLPIPS_CACHE_ENTRIES": "0",
                "RLPIPS_DATA_DIR": str(logs / "data")}  # fmt: skip
        single = base | {"RLPIPS_CPU_STREAMS": "1", "RLPIPS_TORCH_THREADS": "1",
                         "RLPIPS_DECODE_THREADS": "2"}  # fmt: skip
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "independent": lambda: _raw(
                ["--batch", "16", "--independent", str(cores)], args.duration
            ),
            "engine": lambda: _raw(["--batch", "32"], args.duration),
            "service": lambda: _service(1, base, args.duration, logs),
            "service_single_core_replicas": lambda: _service(cores, single, args.duration, logs),
        }
        names = list(steps)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            run: dict[str, Any] = {"round": r, "load_before": os.getloadavg()}
            for name in order:
                run[name] = steps[name]()
                log.info("round %d %s: %s", r, name, run[name])
            best = run["independent"]["pairs_per_s"]
            run["ratios"] = {
                "engine": run["engine"]["engine"] / best,
                "service": run["service"]["pairs_per_s"] / best,
                "service_single_core_replicas": run["service_single_core_replicas"]["pairs_per_s"]
                / best,
            }
            report["rounds"].append(run)
    report["load_after"] = os.getloadavg()
    report["median_ratios"] = {
        k: statistics.median(r["ratios"][k] for r in report["rounds"])
        for k in report["rounds"][0]["ratios"]
    }
    text = json.dumps(report, indent=1)
    log.info("%s", json.dumps(report["median_ratios"]))
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
