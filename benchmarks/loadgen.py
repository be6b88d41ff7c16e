"""Closed-loop HTTP load generator (asyncio + httpx): real JPEG pairs at a fixed concurrency.

Each of ``concurrency`` clients sends ``POST /distance`` (multipart: one reference, one or more candidates)
as soon as its previous answer arrived, for ``duration`` seconds after a warm-up. Bodies are encoded once up
front so the client spends as little CPU as possible (it shares the machine with the server). A request
with N candidates counts N pairs.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --concurrency 32 --duration 30
    python -m benchmarks.loadgen --candidates 8 --shared-references 8   # 1-to-N, few distinct references
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

#: ``../shared`` beside the repository, or ``RLPIPS_SHARED_DIR`` (the bundle ``make gpu-check`` carries).
SHARED = Path(os.environ.get("RLPIPS_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
IMAGENET = SHARED / "images" / "imagenet-sample"


@dataclass(frozen=True)
class Body:
    content: bytes
    content_type: str
    pairs: int = 1


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    pairs: int
    errors: int
    statuses: dict[str, int]
    pairs_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


def _jpegs(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.JPEG"))
    if len(files) < 2:
        raise SystemExit(f"no JPEG pairs in {folder}")
    return files


def _encode(reference: Path, candidates: list[Path]) -> Body:
    files = [("reference", (reference.name, reference.read_bytes(), "image/jpeg"))]
    files += [("candidate", (c.name, c.read_bytes(), "image/jpeg")) for c in candidates]
    req = httpx.Request("POST", "http://x/distance", files=files)
    return Body(req.read(), req.headers["content-type"], len(candidates))


def pair_bodies(folder: Path = IMAGENET, pairs: int = 500) -> list[Body]:
    """Multipart bodies of ``(image 2i, image 2i+1)`` from ``folder`` (real JPEGs), encoded once."""
    files = _jpegs(folder)
    pairs = min(pairs, len(files) // 2)
    return [_encode(files[2 * i], [files[2 * i + 1]]) for i in range(pairs)]


def fanout_bodies(folder: Path = IMAGENET, candidates: int = 8, references: int = 8) -> list[Body]:
    """1-to-N bodies: the references cycle over only ``references`` distinct images (so a reference
    cache hits), each body's ``candidates`` are distinct images, none repeated before the cycle ends."""
    files = _jpegs(folder)
    refs, pool = files[:references], files[references:]
    if not refs or len(pool) < candidates:
        raise SystemExit(f"{folder}: too few images for {references} references + {candidates}")
    n = len(pool) // candidates
    return [
        _encode(refs[i % len(refs)], pool[i * candidates : (i + 1) * candidates]) for i in range(n)
    ]


@dataclass
class _Window:
    """What the clients of one phase saw: latencies of answered requests, statuses, answered pairs."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    pairs: int = 0


async def _client(
    client: httpx.AsyncClient, bodies: list[Body], start: int, stride: int, until: float, w: _Window
) -> None:
    i = start
    while time.perf_counter() < until:
        body = bodies[i % len(bodies)]
        i += stride
        t0 = time.perf_counter()
        try:
            r = await client.post(
                "/distance", content=body.content, headers={"content-type": body.content_type}
            )
            status = str(r.status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        if status == "200":
            w.latencies.append(time.perf_counter() - t0)
            w.pairs += body.pairs
        w.statuses[status] += 1


async def run_load(
    url: str, bodies: list[Body], concurrency: int, duration_s: float, warmup_s: float = 3.0
) -> LoadResult:
    """Warm up for ``warmup_s``, then measure ``duration_s`` of closed-loop load."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        for seconds in (warmup_s, duration_s):  # the last window is the measured one
            w = _Window()
            started = time.perf_counter()
            until = started + seconds
            await asyncio.gather(
                *(_client(client, bodies, k, concurrency, until, w) for k in range(concurrency))
            )
            elapsed = time.perf_counter() - started
    lat_ms = np.array(w.latencies) * 1000 if w.latencies else np.array([float("nan")])
    requests = sum(w.statuses.values())
    return LoadResult(
        concurrency=concurrency,
        seconds=elapsed,
        requests=requests,
        pairs=w.pairs,
        errors=requests - w.statuses.get("200", 0),
        statuses=dict(w.statuses),
        pairs_per_s=w.pairs / elapsed if elapsed > 0 else 0.0,
        p50_ms=float(np.percentile(lat_ms, 50)),
        p95_ms=float(np.percentile(lat_ms, 95)),
        p99_ms=float(np.percentile(lat_ms, 99)),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    p.add_argument("--images", type=Path, default=IMAGENET)
    p.add_argument("--pairs", type=int, default=500, help="distinct pairs to cycle through")
    p.add_argument(
        "--candidates", type=int, default=1, help="candidates per request (N > 1: 1-to-N)"
    )
    p.add_argument(
        "--shared-references", type=int, default=8, help="1-to-N: distinct references cycled"
    )
    args = p.parse_args()
    if args.candidates > 1:
        bodies = fanout_bodies(args.images, args.candidates, args.shared_references)
    else:
        bodies = pair_bodies(args.images, args.pairs)
    result = asyncio.run(run_load(args.url, bodies, args.concurrency, args.duration, args.warmup))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
