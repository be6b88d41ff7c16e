"""Rolling restart under steady load: ``rlpips cluster`` (nginx + N replicas), closed-loop clients sending
``POST /distance`` through nginx, and every replica sent SIGTERM in turn (the next one only after the
previous is back and ready). Reports every request's outcome (failures must be 0), latency percentiles,
the restarts' timeline, and per replica the requests served and reference-cache hits.

    python -m benchmarks.rolling_restart                       # 2 replicas, 16 clients, 60 s
    python -m benchmarks.rolling_restart --no-restart --duration 20 --balance hash \\
        --references 64 --cache-entries 32 --out docs/benchmarks/balance-hash.json

With ``--references K`` each body's reference is one of K images and the request carries
``X-RLPIPS-Reference: <index>``, the key of ``--balance hash`` (reference affinity). Exit status 1 when any
request failed while replicas restarted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.loadgen import IMAGENET, Body, _encode, _jpegs
from tests.support.apiutil import metric
from tests.support.serverutil import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcomes:
    """What the clients saw: (seconds since start, status or exception name, latency seconds)."""

    rows: list[tuple[float, str, float]] = field(default_factory=list)
    pairs: int = 0


def bodies(references: int, candidates: int) -> list[tuple[int, Body]]:
    """``(reference index, body)``: references cycle over ``references`` images, candidates over the
    rest of the sample; with ``references`` 0 every body has its own reference (pairs)."""
    files = _jpegs(IMAGENET)
    if references <= 0:
        n = len(files) // (candidates + 1)
        step = candidates + 1
        return [
            (i, _encode(files[i * step], files[i * step + 1 : (i + 1) * step])) for i in range(n)
        ]
    refs, pool = files[:references], files[references:]
    n = len(pool) // candidates
    return [
        (i % references, _encode(refs[i % references], pool[i * candidates : (i + 1) * candidates]))
        for i in range(n)
    ]


async def client_loop(
    client: httpx.AsyncClient,
    work: list[tuple[int, Body]],
    start: int,
    stride: int,
    t0: float,
    until: float,
    out: Outcomes,
) -> None:
    i = start
    while time.monotonic() < until:
        ref, body = work[i % len(work)]
        i += stride
        headers = {"content-type": body.content_type, "x-rlpips-reference": str(ref)}
        began = time.monotonic()
        try:
            r = await client.post("/distance", content=body.content, headers=headers)
            status = str(r.status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        out.rows.append((began - t0, status, time.monotonic() - began))
        out.pairs += body.pairs if status == "200" else 0


def state(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


async def restarts(
    state_file: Path, t0: float, settle_s: float, pause_s: float
) -> list[dict[str, Any]]:
    """SIGTERM each replica in turn; wait for its successor to be ready before the next."""
    events: list[dict[str, Any]] = []
    await asyncio.sleep(settle_s)
    for replica in state(state_file)["replicas"]:
        old = replica["pid"]
        sent = time.monotonic()
        os.kill(old, signal.SIGTERM)
        while True:
            now = state(state_file)["replicas"][replica["index"]]
            if now["pid"] not in (None, old) and now["ready"]:
                break
            await asyncio.sleep(0.1)
        back = time.monotonic()
        events.append(
            {
                "replica": replica["index"],
                "sigterm_at_s": round(sent - t0, 2),
                "ready_again_at_s": round(back - t0, 2),
                "old_pid": old,
                "new_pid": now["pid"],
            }
        )
        await asyncio.sleep(pause_s)
    return events


async def drive(args: argparse.Namespace, url: str, state_file: Path) -> dict[str, Any]:
    work = bodies(args.references, args.candidates)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as client:
        t0 = time.monotonic()
        out = Outcomes()
        until = t0 + args.duration
        loops = [
            client_loop(client, work, k, args.clients, t0, until, out) for k in range(args.clients)
        ]
        restart = None if args.no_restart else restarts(state_file, t0, args.settle, args.pause)
        results = await asyncio.gather(*loops, *([restart] if restart else []))
        elapsed = time.monotonic() - t0
    events = results[-1] if restart else []
    statuses = Counter(s for _, s, _ in out.rows)
    ok = np.array([lat for _, s, lat in out.rows if s == "200"] or [float("nan")]) * 1000
    return {
        "requests": len(out.rows),
        "failures": len(out.rows) - statuses.get("200", 0),
        "statuses": dict(statuses),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(out.rows) / elapsed, 2),
        "pairs_per_s": round(out.pairs / elapsed, 2),
        "p50_ms": round(float(np.percentile(ok, 50)), 1),
        "p99_ms": round(float(np.percentile(ok, 99)), 1),
        "max_ms": round(float(np.max(ok)), 1),
        "restarts": events,
        "failures_detail": [(round(t, 2), s) for t, s, _ in out.rows if s != "200"][:20],
    }


def replica_stats(state_file: Path) -> list[dict[str, Any]]:
    stats = []
    for r in state(state_file)["replicas"]:
        text = httpx.get(f"http://127.0.0.1:{r['port']}/metrics", timeout=10).text
        hits = metric(text, "rlpips_cache_requests_total", result="hit")
        misses = metric(text, "rlpips_cache_requests_total", result="miss")
        stats.append(
            {
                "replica": r["index"],
                "served_200_since_its_start": metric(
                    text, "rlpips_requests_total", endpoint="/distance", status="200"
                ),
                "cache_hits": hits,
                "cache_misses": misses,
            }
        )
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--candidates", type=int, default=1, help="candidates per request")
    p.add_argument("--references", type=int, default=0, help="distinct references; 0: all distinct")
    p.add_argument("--cache-entries", type=int, help="RLPIPS_CACHE_ENTRIES of each replica")
    p.add_argument("--balance", choices=["least_conn", "hash"], default="least_conn")
    p.add_argument("--no-restart", action="store_true", help="steady load only")
    p.add_argument("--settle", type=float, default=5.0, help="seconds of load before the first")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between two restarts")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args()

    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="rolling-"))
    state_file = tmp / "state.json"
    env = os.environ | {
        "RLPIPS_RESOLUTION": str(args.resolution),
        "RLPIPS_MODELS": "lpips-alex",
        "RLPIPS_DEFAULT_MODEL": "lpips-alex",
    }
    if args.cache_entries is not None:
        env["RLPIPS_CACHE_ENTRIES"] = str(args.cache_entries)
    cmd = [sys.executable, "-m", "app.cli", "cluster", "--replicas", str(args.replicas)]
    cmd += ["--port", str(port), "--state-file", str(state_file), "--log-dir", str(tmp)]
    cmd += ["--balance", args.balance]
    load_before = os.getloadavg()
    cluster = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        while not (state_file.exists() and state(state_file)["nginx_pid"]):
            if cluster.poll() is not None:
                raise SystemExit(f"cluster exited with {cluster.returncode}")
            time.sleep(0.3)
        report = asyncio.run(drive(args, f"http://127.0.0.1:{port}", state_file))
        report["replicas_after"] = replica_stats(state_file)
    finally:
        cluster.send_signal(signal.SIGTERM)
        cluster.wait(120)
    hits = sum(r["cache_hits"] for r in report["replicas_after"])
    lookups = hits + sum(r["cache_misses"] for r in report["replicas_after"])
    report = {
        "command": "python -m benchmarks.rolling_restart " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",) and v is not None},
        "drain_s": env.get("RLPIPS_DRAIN_S", "default"),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cache_hit_rate": round(hits / lookups, 3) if lookups else None,
        **report,
    }
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if report["failures"] and not args.no_restart:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
