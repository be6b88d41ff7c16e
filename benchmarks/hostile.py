"""Hostile uploads against a real ``rlpips serve`` (default settings) on 127.0.0.1: the issue-12 targets.

1. **Cost of one hostile request** (each body at most 1 MiB): the server's CPU seconds and its peak
   memory (Linux: ``VmHWM`` reset through ``/proc/PID/clear_refs`` before each request) above the RSS
   just before it, and — an upper bound, since freed heap stays resident — above the RSS of the warmed-up
   server before the first hostile request; the status it answered; the worst of ``--repeats``.
2. **A normal client under hostile load**: one closed-loop client sends real ImageNet pairs for
   ``--duration`` seconds on the idle service, then again while hostile requests arrive at
   ``--rate`` per second (open loop, cycling through the kinds); its p50/p99 in both phases, the ratio,
   and every error it saw.
3. Afterwards: no 5xx anywhere, no ``Traceback`` in the server log, ``/readyz`` 200.

    python -m benchmarks.hostile --json docs/benchmarks/hostile.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings
from app.imaging import ImageError, inspect
from benchmarks.soak import IMAGENET, free_port, proc_stats, start_server, wait_ready
from tests.support import hostile as h

MIB = 1024 * 1024


@dataclass(frozen=True)
class Hostile:
    """One hostile request: a name, the ``httpx`` keyword arguments of a ``POST /distance``."""

    name: str
    request: dict[str, Any]

    @property
    def size(self) -> int:
        files = self.request.get("files", [])
        body = sum(len(f[1][1]) for f in files) + len(self.request.get("content", b""))
        return body


def _fill(
    reference: bytes, image: bytes, limit: int = MIB - 64 * 1024, count: int = 32
) -> dict[str, Any]:
    """Multipart: a real reference, then as many copies of ``image`` as fit in about 1 MiB (at most
    ``count``)."""
    n = max(1, min(count, (limit - len(reference)) // max(1, len(image))))
    files = [("reference", ("r.jpg", reference))]
    files += [("candidate", (f"c{i}", image)) for i in range(n)]
    return {"files": files}


def hostile_requests(reference: bytes) -> list[Hostile]:
    """Every kind, each body at most 1 MiB."""
    images: dict[str, Callable[[], bytes]] = {
        "png-zeros-6000x6000": lambda: h.png_zeros(6000, 6000),
        "png-zeros-rgba-6300x6300": lambda: h.png_zeros(6300, 6300, 8, 6),
        "png16-zeros-6300x6300": lambda: h.png_zeros(6300, 6300, 16, 0),
        "png-40000000x1": lambda: h.png_zeros(40_000_000, 1),
        "png-1x40000000": lambda: h.png_zeros(1, 40_000_000),
        "jpeg-flat-6000x6000": lambda: h.jpeg_flat(6000, 6000),
        "jpeg-progressive-20-scans": lambda: h.jpeg_scan_bomb(repeats=10),
        "jpeg-progressive-60-scans": lambda: h.jpeg_scan_bomb(repeats=50),
        "jpeg-scan-bomb-1000": lambda: h.jpeg_scan_bomb(repeats=1000),
        "jpeg-lying-header-6000": h.jpeg_lying_header,
        "webp-16383x2441": h.webp_big,
        "webp-8000x4000": lambda: h.webp_big(8000, 4000),
        "tiff-deflate-6000x6000": lambda: h.tiff_deflate(6000, 6000),
        "bmp-rle-6000x6000": lambda: h.bmp_rle(6000, 6000),
        "gif-65535x65535": h.gif_bomb,
    }
    budget = Settings().max_request_pixels - inspect(reference).cost
    out = []
    for name, make in images.items():
        image = make()
        out.append(Hostile(name, _fill(reference, image)))
        try:  # the most copies the per-request decode budget accepts: the worst accepted request
            fit = budget // inspect(image).cost
        except ImageError:
            continue
        if fit >= 1:
            out.append(Hostile(f"{name}-x{fit}", _fill(reference, image, count=fit)))
    bomb = h.png_zeros(6000, 6000)
    doc = {
        "reference": base64.b64encode(reference).decode(),
        "candidates": [base64.b64encode(bomb).decode()] * 6,
    }
    out.append(Hostile("json-6-png-bombs", {"content": json.dumps(doc).encode(),
                                            "headers": {"content-type": "application/json"}}))  # fmt: skip
    many = [("reference", ("r.jpg", reference))] + [
        ("candidate", (f"c{i}", b"x" * 3000)) for i in range(300)
    ]
    out.append(Hostile("multipart-300-files", {"files": many}))
    return [k for k in out if k.size <= MIB]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(ln for ln in status.splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


async def settle(pid: int, quiet_s: float = 0.5, limit_s: float = 30.0) -> None:
    """Wait until the server stops using CPU (work left in decode threads has finished)."""
    end = time.monotonic() + limit_s
    last = cpu_seconds(pid)
    while time.monotonic() < end:
        await asyncio.sleep(quiet_s)
        now = cpu_seconds(pid)
        if now - last < 0.02 * quiet_s:
            return
        last = now


async def measure_costs(
    client: httpx.AsyncClient, pid: int, kinds: list[Hostile], repeats: int
) -> list[dict[str, Any]]:
    rows = []
    await settle(pid)
    fresh = proc_stats(pid)["rss_mib"]
    for kind in kinds:
        worst: dict[str, Any] = {"kind": kind.name, "body_bytes": kind.size, "cpu_s": 0.0,
                                 "peak_above_idle_mib": 0.0, "wall_s": 0.0}  # fmt: skip
        for _ in range(repeats):
            await settle(pid)
            idle = proc_stats(pid)["rss_mib"]
            reset_peak(pid)
            cpu0, t0 = cpu_seconds(pid), time.perf_counter()
            r = await client.post("/distance", **kind.request)
            wall = time.perf_counter() - t0
            await settle(pid)
            worst["status"] = r.status_code
            worst["code"] = r.json().get("error", {}).get("code") if r.status_code != 200 else None
            worst["cpu_s"] = max(worst["cpu_s"], cpu_seconds(pid) - cpu0)
            peak = peak_mib(pid)
            worst["peak_above_idle_mib"] = max(worst["peak_above_idle_mib"], peak - idle)
            worst["peak_above_fresh_mib"] = max(
                worst.get("peak_above_fresh_mib", 0.0), peak - fresh
            )
            worst["wall_s"] = max(worst["wall_s"], wall)
        rows.append(worst)
        print(f"{kind.name:28s} {kind.size / 1024:7.0f} KiB  {worst['status']} "
              f"{worst['code'] or '':18s} cpu {worst['cpu_s']:.2f} s  peak +{worst['peak_above_idle_mib']:.0f} MiB "
              f"(+{worst['peak_above_fresh_mib']:.0f} over the fresh server)")  # fmt: skip
    return rows


async def normal_client(url: str, pair: tuple[bytes, bytes], duration_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    files = [("reference", ("r.jpg", pair[0])), ("candidate", ("c.jpg", pair[1]))]
    end = time.monotonic() + duration_s
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                r = await client.post("/distance", files=files)
                if r.status_code != 200:
                    errors[str(r.status_code)] += 1
                else:
                    latencies.append(time.perf_counter() - t0)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
    qs = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"requests": len(latencies) + sum(errors.values()), "errors": dict(errors),
            "p50_ms": qs[49] * 1000, "p99_ms": qs[98] * 1000}  # fmt: skip


async def hostile_sender(
    url: str, kinds: list[Hostile], rate: float, duration_s: float
) -> Counter[str]:
    statuses: Counter[str] = Counter()

    async def one(kind: Hostile, client: httpx.AsyncClient) -> None:
        try:
            r = await client.post("/distance", **kind.request)
            statuses[f"{r.status_code}"] += 1
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        tasks, i, start = [], 0, time.monotonic()
        while time.monotonic() - start < duration_s:
            tasks.append(asyncio.create_task(one(kinds[i % len(kinds)], client)))
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    return statuses


async def run(args: argparse.Namespace) -> dict[str, Any]:
    files = sorted(IMAGENET.glob("*.JPEG"))
    pair = (files[0].read_bytes(), files[1].read_bytes())
    kinds = hostile_requests(pair[0])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(args.log)
    proc = start_server(port, {}, log)
    try:
        await wait_ready(url, proc)
        pid = proc.pid
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            await normal_client(url, pair, 3)  # warm-up
            costs = await measure_costs(client, pid, kinds, args.repeats)
        idle = await normal_client(url, pair, args.duration)
        loaded, hostile = await asyncio.gather(
            normal_client(url, pair, args.duration),
            hostile_sender(url, kinds, args.rate, args.duration),
        )
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            ready = (await client.get("/readyz")).status_code
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    return {
        "command": "python -m benchmarks.hostile " + " ".join(args.argv),
        "load_average": os.getloadavg(),
        "costs": costs,
        "normal_idle": idle,
        "normal_under_hostile": loaded,
        "p99_ratio": loaded["p99_ms"] / idle["p99_ms"],
        "hostile_statuses": dict(hostile),
        "server_5xx": sum(n for s, n in hostile.items() if s.startswith("5")),
        "tracebacks": text.count("Traceback"),
        "readyz_after": ready,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds per latency phase")
    p.add_argument("--rate", type=float, default=1.0, help="hostile requests per second")
    p.add_argument("--repeats", type=int, default=2, help="measurements per hostile kind")
    p.add_argument("--log", default="/tmp/rlpips-hostile-server.log")
    p.add_argument("--json", help="write the results here")
    import sys

    args = p.parse_args()
    args.argv = sys.argv[1:]
    result = asyncio.run(run(args))
    i, u = result["normal_idle"], result["normal_under_hostile"]
    print(f"normal client p99: idle {i['p99_ms']:.1f} ms, under hostile {u['p99_ms']:.1f} ms "
          f"(x{result['p99_ratio']:.2f}); errors {u['errors']}; hostile {result['hostile_statuses']}; "
          f"tracebacks {result['tracebacks']}; /readyz {result['readyz_after']}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
