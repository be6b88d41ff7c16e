"""One benchmark session: the service and its peers, same payloads, same machine, same run (issue 7).

Targets run one after another (never together), in an order rotated per repeat so that drift on a shared
machine spreads over all of them. Each server is started once per repeat and loaded at every
``--concurrency`` level in turn (a warm-up before each level); ratios are taken within each repeat and
concurrency, then the median over repeats.

* ``service``: ``rlpips serve``, ``lpips-alex`` only, reference cache off (``--cache-entries``, default 0),
  1-to-1 requests (one reference, one candidate; ``--pairs`` distinct pairs).
* ``naive``: ``benchmarks/naive_server.py`` (one model call per request), same requests.
* ``litserve``: ``benchmarks/litserve_server.py`` (LitServe, batching with the service's batch settings).
* ``raw``: ``benchmarks/raw.py``, the model alone on pre-decoded tensors, at the service's max batch
  (``--batch``) and at batch 1 (the single-pair inference time, ``single_pair_ms``).
* ``cached``: the service with the reference cache on (``--cached-entries``) and 1-to-N requests
  (``--candidates`` N per request, references cycling over ``--shared-references`` K distinct images).
  ``--cache-ratio`` runs ``service`` and ``cached`` and reports cached / service pairs/s.

``--service-env RLPIPS_X=V`` applies to every server (the LitServe peer reads the same batch settings).

    python -m benchmarks.run --resolution 64 --concurrency 1,8,32 --duration 10 --warmup 3 --repeats 3
    python -m benchmarks.run --resolution 64 --cache-ratio --concurrency 32 --json cache.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.loadgen import IMAGENET, Body, fanout_bodies, pair_bodies, run_load
from benchmarks.summary import summarize, table

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("service", "naive", "litserve", "raw", "cached")
DEFAULT_TARGETS = "service,naive,litserve,raw"
READY_PATH = {"service": "/readyz", "cached": "/readyz", "naive": "/readyz", "litserve": "/health"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(args: argparse.Namespace, target: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RLPIPS_WEIGHTS_DIR", str(ROOT.parent / "shared" / "weights"))
    env["RLPIPS_RESOLUTION"] = str(args.resolution)
    env["RLPIPS_MODELS"] = "lpips-alex"
    env["RLPIPS_DEFAULT_MODEL"] = "lpips-alex"
    env["RLPIPS_MAX_BATCH_PAIRS"] = str(args.batch)
    env["RLPIPS_CACHE_ENTRIES"] = str(args.cache_entries)
    if target == "cached":
        env["RLPIPS_CACHE_ENTRIES"] = str(args.cached_entries)
        env["RLPIPS_MAX_CANDIDATES"] = str(max(32, args.candidates))
    if args.torch_threads:
        env["RLPIPS_TORCH_THREADS"] = str(args.torch_threads)
    for item in args.service_env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def _server_cmd(target: str, port: int) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if target in ("service", "cached"):
        return [sys.executable, "-m", "app.cli", "serve", *common]
    if target == "litserve":
        return [sys.executable, "-m", "benchmarks.litserve_server", *common]
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks.naive_server:create_app",
        "--factory",
        *common,
    ]


def start_server(
    target: str, args: argparse.Namespace
) -> tuple[subprocess.Popen[bytes], str, float]:
    """Start ``target``'s server (own process group) and wait for its readiness URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        _server_cmd(target, port), cwd=ROOT, env=_env(args, target), start_new_session=True
    )
    while True:
        if proc.poll() is not None:
            stop_server(proc)
            raise SystemExit(f"{target} server exited with {proc.returncode}")
        try:
            if httpx.get(url + READY_PATH[target], timeout=2).status_code == 200:
                return proc, url, time.monotonic() - t0
        except httpx.TransportError:
            pass
        if time.monotonic() - t0 > 300:
            stop_server(proc)
            raise SystemExit(f"{target} server not ready after 300 s")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL to the whole process group (LitServe has worker processes)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything the server left behind


def _serve_and_load(target: str, args: argparse.Namespace, bodies: list[Body]) -> dict[str, Any]:
    proc, url, startup_s = start_server(target, args)
    try:
        levels = {str(c): _level(target, url, proc.pid, c, args, bodies) for c in args.levels}
        return {"startup_s": startup_s, "levels": levels}
    finally:
        stop_server(proc)


def _level(
    target: str, url: str, pid: int, c: int, args: argparse.Namespace, bodies: list[Body]
) -> dict[str, Any]:
    """Warm up, then measure closed-loop load at concurrency ``c``; server CPU over the process tree."""
    asyncio.run(run_load(url, bodies, c, 0.0, args.warmup))
    metrics0 = _metric_values(url) if target in ("service", "cached") else {}
    cpu0, me0 = _tree_cpu(pid), time.process_time()
    load = asyncio.run(run_load(url, bodies, c, args.duration, 0.0))
    cpu1, me1 = _tree_cpu(pid), time.process_time()
    result = asdict(load)
    result["cpu_ms_per_pair"] = 1000 * (cpu1 - cpu0) / max(load.pairs, 1)
    result["client_cpu_ms_per_pair"] = 1000 * (me1 - me0) / max(load.pairs, 1)
    if metrics0:
        result["diagnostics"] = _diagnostics(metrics0, _metric_values(url))
    print(
        f"  {target} c={c}: {load.pairs_per_s:.2f} pairs/s, p50 {load.p50_ms:.0f} ms, "
        f"{load.errors} errors",
        file=sys.stderr,
        flush=True,
    )
    return result


def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid → (parent pid, state, user + system CPU seconds) of every process (Linux ``/proc``)."""
    table: dict[int, tuple[int, str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(d.name)] = (int(fields[1]), fields[0], (int(fields[11]) + int(fields[12])) / tick)
    return table


def process_tree(pid: int, table: dict[int, tuple[int, str, float]] | None = None) -> set[int]:
    """``pid`` and its live descendants (LitServe: manager, inference workers, uvicorn)."""
    table = _proc_table() if table is None else table
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (pp, _, _) in table.items() if pp == parent and p not in tree]
        tree.update(kids)
        frontier += kids
    return {p for p in tree if p in table and table[p][1] != "Z"}


def _tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    table = _proc_table()
    return sum(table[p][2] for p in process_tree(pid, table))


def _metric_values(url: str) -> dict[str, float]:
    """The service's ``/metrics`` samples summed over labels (only ``kind="distance"`` where labelled
    by kind; cache lookups per ``result``)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    v: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if "result" in sample.labels:  # cache lookups: hit / miss
                name = f"{name}:{sample.labels['result']}"
            elif sample.labels and sample.labels.get("kind") != "distance":
                continue
            v[name] = v.get(name, 0.0) + sample.value
    return v


def _diagnostics(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean batch size, decode / device / queue time over one measured window (``/metrics`` deltas)."""

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    pairs = d("rlpips_batch_size_sum") or 1.0
    hits = d("rlpips_cache_requests_total:hit")
    return {
        "mean_batch_pairs": pairs / (d("rlpips_batch_size_count") or 1.0),
        "decode_ms_per_image": 1000
        * d("rlpips_decode_duration_seconds_sum")
        / (d("rlpips_decode_duration_seconds_count") or 1.0),
        "device_ms_per_pair": 1000 * d("rlpips_inference_duration_seconds_sum") / pairs,
        "queue_wait_ms_mean": 1000
        * d("rlpips_queue_wait_seconds_sum")
        / (d("rlpips_queue_wait_seconds_count") or 1.0),
        "cache_hit_rate": hits / ((hits + d("rlpips_cache_requests_total:miss")) or 1.0),
    }


def _raw(args: argparse.Namespace) -> dict[str, Any]:
    """``benchmarks.raw`` at the service's max batch and at batch 1, in one process."""
    cmd = [sys.executable, "-m", "benchmarks.raw", "--resolution", str(args.resolution)]
    cmd += ["--batch", f"{args.batch},1", "--duration", str(args.duration)]
    cmd += ["--warmup", str(args.warmup)]
    out = subprocess.run(
        cmd, cwd=ROOT, env=_env(args, "raw"), capture_output=True, text=True, check=True
    )
    lines = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    by_batch = {ln["batch"]: ln for ln in lines}
    batch, single = by_batch[args.batch], by_batch[1]
    print(
        f"  raw: {batch['pairs_per_s']:.2f} pairs/s at batch {args.batch}, "
        f"single pair {single['batch_ms']:.2f} ms",
        file=sys.stderr,
        flush=True,
    )
    return {"batch": batch, "single": single}


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
    versions: dict[str, str | None] = {}
    for pkg in ("torch", "litserve", "fastapi", "uvicorn", "httpx", "pillow"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "versions": versions,
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "loadavg_start": os.getloadavg(),
    }


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=32, help="service max batch pairs = raw batch")
    p.add_argument("--targets", help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument(
        "--torch-threads", type=int, default=0, help="intra-op threads, all (0: default)"
    )
    p.add_argument("--cache-entries", type=int, default=0, help="service reference cache (0: off)")
    p.add_argument("--service-env", action="append", default=[], metavar="RLPIPS_X=V")
    p.add_argument("--pairs", type=int, default=500, help="distinct JPEG pairs cycled through")
    p.add_argument("--cache-ratio", action="store_true", help="add service + cached; their ratio")
    p.add_argument("--candidates", type=int, default=8, help="cached: candidates per request")
    p.add_argument("--shared-references", type=int, default=8, help="cached: distinct references")
    p.add_argument("--cached-entries", type=int, default=1024, help="cached: reference cache size")
    p.add_argument("--json", type=Path, help="also write every run and the summary here")
    args = p.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",") if c]
    default = "service,cached" if args.cache_ratio else DEFAULT_TARGETS
    args.target_list = [t for t in (args.targets or default).split(",") if t]
    if args.cache_ratio:
        args.target_list += [t for t in ("service", "cached") if t not in args.target_list]
    unknown = set(args.target_list) - set(TARGETS)
    if unknown or not args.levels:
        p.error(f"unknown targets {sorted(unknown)}" if unknown else "no concurrency level")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    targets = args.target_list
    bodies = {"pairs": pair_bodies(IMAGENET, args.pairs)}
    if "cached" in targets:
        bodies["cached"] = fanout_bodies(IMAGENET, args.candidates, args.shared_references)
    machine = _machine()
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    orders = []
    for rep in range(args.repeats):
        order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
        orders.append(order)
        print(f"repeat {rep + 1}/{args.repeats}: {', '.join(order)}", file=sys.stderr, flush=True)
        for t in order:
            if t == "raw":
                runs[t].append(_raw(args))
            else:
                runs[t].append(_serve_and_load(t, args, bodies.get(t, bodies["pairs"])))
    machine["loadavg_end"] = os.getloadavg()
    summary = summarize(runs, args.levels)
    print(table(summary, args.repeats))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        doc = {
            "argv": [sys.executable, "-m", "benchmarks.run", *argv],
            "args": plain,
            "machine": machine,
            "orders": orders,
            "runs": runs,
            "summary": summary,
        }
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
