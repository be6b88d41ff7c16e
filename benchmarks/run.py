"""One benchmark session: the service, the naive peer and the raw batched model, same payloads, same run.

Targets run one after another (never together), in a rotated order per repeat so that drift on a shared
machine spreads over all of them; ratios are taken within each repeat, then the median over repeats.

    python -m benchmarks.run --resolution 256 --concurrency 32 --duration 30 --repeats 3
    python -m benchmarks.run --resolution 64 --concurrency 32 --duration 20 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.loadgen import IMAGENET, pair_bodies, run_load

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("service", "naive", "raw")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RLPIPS_WEIGHTS_DIR", str(ROOT.parent / "shared" / "weights"))
    env["RLPIPS_RESOLUTION"] = str(args.resolution)
    env["RLPIPS_MODELS"] = "lpips-alex"
    env["RLPIPS_DEFAULT_MODEL"] = "lpips-alex"
    env["RLPIPS_MAX_BATCH_PAIRS"] = str(args.batch)
    env["RLPIPS_CACHE_ENTRIES"] = str(args.cache_entries)
    if args.torch_threads:
        env["RLPIPS_TORCH_THREADS"] = str(args.torch_threads)
    for item in args.service_env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def _server_cmd(kind: str, port: int) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if kind == "service":
        return [sys.executable, "-m", "app.cli", "serve", *common]
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks.naive_server:create_app",
        "--factory",
        *common,
    ]


def _serve_and_load(kind: str, args: argparse.Namespace, bodies: list[Any]) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(_server_cmd(kind, port), cwd=ROOT, env=_env(args))
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{kind} server exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{kind} server not ready after 300 s")
            time.sleep(0.3)
        asyncio.run(run_load(url, bodies, args.concurrency, 0.0, args.warmup))
        cpu0, me0 = _proc_cpu(proc.pid), time.process_time()
        load = asyncio.run(run_load(url, bodies, args.concurrency, args.duration, 0.0))
        cpu1, me1 = _proc_cpu(proc.pid), time.process_time()
        result = asdict(load)
        result["cpu_ms_per_pair"] = 1000 * (cpu1 - cpu0) / max(load.pairs, 1)
        result["client_cpu_ms_per_pair"] = 1000 * (me1 - me0) / max(load.pairs, 1)
        if kind == "service":
            result["diagnostics"] = _diagnostics(httpx.get(f"{url}/metrics", timeout=10).text)
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _diagnostics(text: str) -> dict[str, float]:
    """Mean batch size, decode / device / queue time from the service's own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    v: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels or sample.labels.get("kind") == "distance":
                v[sample.name] = v.get(sample.name, 0.0) + sample.value
    pairs = v.get("rlpips_batch_size_sum", 0.0) or 1.0
    return {
        "mean_batch_pairs": pairs / (v.get("rlpips_batch_size_count", 0.0) or 1.0),
        "decode_ms_per_image": 1000
        * v.get("rlpips_decode_duration_seconds_sum", 0.0)
        / (v.get("rlpips_decode_duration_seconds_count", 0.0) or 1.0),
        "device_ms_per_pair": 1000 * v.get("rlpips_inference_duration_seconds_sum", 0.0) / pairs,
        "queue_wait_ms_mean": 1000
        * v.get("rlpips_queue_wait_seconds_sum", 0.0)
        / (v.get("rlpips_queue_wait_seconds_count", 0.0) or 1.0),
    }


def _raw(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.raw", "--resolution", str(args.resolution)]
    cmd += ["--batch", str(args.batch), "--duration", str(args.duration)]
    cmd += ["--warmup", str(args.warmup)]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(args), capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }


def _summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    med = {t: statistics.median(r["pairs_per_s"] for r in runs[t]) for t in runs if runs[t]}
    out: dict[str, Any] = {"median_pairs_per_s": med}
    if runs.get("service") and runs.get("raw"):
        ratios = [
            s["pairs_per_s"] / r["pairs_per_s"]
            for s, r in zip(runs["service"], runs["raw"], strict=True)
        ]
        out["service_over_raw"] = {"per_repeat": ratios, "median": statistics.median(ratios)}
    if runs.get("service") and runs.get("naive"):
        ratios = [
            s["pairs_per_s"] / n["pairs_per_s"]
            for s, n in zip(runs["service"], runs["naive"], strict=True)
        ]
        out["service_over_naive"] = {"per_repeat": ratios, "median": statistics.median(ratios)}
    cpu = {t: statistics.median(r["cpu_ms_per_pair"] for r in runs[t]) for t in runs if runs[t]}
    out["median_cpu_ms_per_pair"] = cpu
    if "service" in cpu:
        out["cpu_efficiency_vs_service"] = {t: cpu[t] / cpu["service"] for t in cpu}
    if runs.get("service"):
        diag = [r["diagnostics"] for r in runs["service"]]
        out["service_diagnostics"] = {k: statistics.median(d[k] for d in diag) for k in diag[0]}
    for t in ("service", "naive"):
        if runs.get(t):
            out[f"{t}_latency_ms"] = {
                q: statistics.median(r[f"{q}_ms"] for r in runs[t]) for q in ("p50", "p95", "p99")
            }
            out[f"{t}_errors"] = sum(r["errors"] for r in runs[t])
    return out


def _table(args: argparse.Namespace, summary: dict[str, Any]) -> str:
    med = summary["median_pairs_per_s"]
    cpu = summary["median_cpu_ms_per_pair"]
    rows = [
        f"| target | pairs/s (median of {args.repeats}) | p50 ms | p95 ms | p99 ms | CPU ms/pair |",
        "|---|---|---|---|---|---|",
    ]
    for t in TARGETS:
        if t not in med:
            continue
        lat = summary.get(f"{t}_latency_ms")
        cells = [f"{lat[q]:.0f}" for q in ("p50", "p95", "p99")] if lat else ["—"] * 3
        rows.append(f"| {t} | {med[t]:.1f} | " + " | ".join(cells) + f" | {cpu[t]:.1f} |")
    if "service_diagnostics" in summary:
        diag = ", ".join(f"{k} {v:.2f}" for k, v in summary["service_diagnostics"].items())
        rows.append(f"\nservice /metrics: {diag}")
    if "cpu_efficiency_vs_service" in summary:
        eff = ", ".join(f"{t} {r:.2f}" for t, r in summary["cpu_efficiency_vs_service"].items())
        rows.append(f"\nCPU per pair relative to the service: {eff}")
    for key in ("service_over_raw", "service_over_naive"):
        if key in summary:
            per = ", ".join(f"{r:.2f}" for r in summary[key]["per_repeat"])
            rows.append(f"\n{key}: median {summary[key]['median']:.2f} (per repeat: {per})")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per target")
    p.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=32, help="service max batch pairs = raw batch")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    p.add_argument(
        "--torch-threads", type=int, default=0, help="intra-op threads for all targets (0: default)"
    )
    p.add_argument("--cache-entries", type=int, default=0, help="service reference cache (0: off)")
    p.add_argument("--service-env", action="append", default=[], metavar="RLPIPS_X=V")
    p.add_argument("--pairs", type=int, default=500, help="distinct JPEG pairs cycled through")
    p.add_argument("--json", type=Path, help="also write every run and the summary here")
    args = p.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    bodies = pair_bodies(IMAGENET, args.pairs)
    machine = _machine()
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    for rep in range(args.repeats):
        order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
        for t in order:
            result = _raw(args) if t == "raw" else _serve_and_load(t, args, bodies)
            runs[t].append(result)
            print(
                f"repeat {rep + 1} {t}: {result['pairs_per_s']:.2f} pairs/s",
                file=sys.stderr,
                flush=True,
            )
    machine["loadavg_end"] = os.getloadavg()
    summary = _summary(runs)
    print(_table(args, summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": machine,
            "runs": runs,
            "summary": summary,
        }
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
