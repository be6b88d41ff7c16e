"""Closed-loop HTTP load generator (asyncio + httpx): real JPEG pairs at a fixed concurrency.

Each of ``concurrency`` clients sends ``POST /distance`` (multipart: one reference, one candidate) as soon as
its previous answer arrived, for ``duration`` seconds after a warm-up. Bodies are encoded once up front so
the client spends as little CPU as possible (it shares the machine with the server).

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --concurrency 32 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "images" / "imagenet-sample"


@dataclass(frozen=True)
class Body:
    content: bytes
    content_type: str


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


def pair_bodies(folder: Path = IMAGENET, pairs: int = 500) -> list[Body]:
    """Multipart bodies of ``(image 2i, image 2i+1)`` from ``folder`` (real JPEGs), encoded once."""
    files = sorted(folder.glob("*.JPEG"))
    if len(files) < 2:
        raise SystemExit(f"no JPEG pairs in {folder}")
    pairs = min(pairs, len(files) // 2)
    out = []
    for i in range(pairs):
        a, b = files[2 * i], files[2 * i + 1]
        req = httpx.Request(
            "POST",
            "http://x/distance",
            files=[
                ("reference", (a.name, a.read_bytes(), "image/jpeg")),
                ("candidate", (b.name, b.read_bytes(), "image/jpeg")),
            ],
        )
        out.append(Body(req.read(), req.headers["content-type"]))
    return out


async def _client(
    client: httpx.AsyncClient,
    bodies: list[Body],
    start: int,
    stride: int,
    until: float,
    latencies: list[float],
    statuses: Counter[str],
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
            latencies.append(time.perf_counter() - t0)
        statuses[status] += 1


async def run_load(
    url: str, bodies: list[Body], concurrency: int, duration_s: float, warmup_s: float = 3.0
) -> LoadResult:
    """Warm up for ``warmup_s``, then measure ``duration_s`` of closed-loop load."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        for phase, seconds in (("warmup", warmup_s), ("measure", duration_s)):
            latencies: list[float] = []
            statuses: Counter[str] = Counter()
            started = time.perf_counter()
            until = started + seconds
            await asyncio.gather(
                *(
                    _client(client, bodies, k, concurrency, until, latencies, statuses)
                    for k in range(concurrency)
                )
            )
            elapsed = time.perf_counter() - started
            if phase == "warmup":
                continue
    lat_ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    ok = statuses.get("200", 0)
    return LoadResult(
        concurrency=concurrency,
        seconds=elapsed,
        requests=sum(statuses.values()),
        pairs=ok,
        errors=sum(statuses.values()) - ok,
        statuses=dict(statuses),
        pairs_per_s=ok / elapsed,
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
    args = p.parse_args()
    bodies = pair_bodies(args.images, args.pairs)
    result = asyncio.run(run_load(args.url, bodies, args.concurrency, args.duration, args.warmup))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
