"""Soak test: mixed traffic, bad inputs included, against a real ``rlpips serve`` on 127.0.0.1.

Starts the server, then ``--concurrency`` clients send a weighted mix for ``--duration`` seconds (bounded
by ``MAX_DURATION_S``): ``/distance`` (multipart and JSON, 1-4 real ImageNet candidates), small
``/robustness-check`` attacks, hostile inputs from the bad-input catalogue (each with its expected 4xx),
and ``/models``, ``/readyz``, ``/metrics``. Every ``--sample`` seconds it records the server's RSS,
threads and open files. At the end it sends SIGTERM and times the shutdown. Prints a Markdown report
and writes JSON; exits 1 when any answer was unexpected (a 5xx, or not the status the kind expects).

    python -m benchmarks.soak --duration 600 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support import badinputs as bad

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ROOT.parent / "shared" / "images" / "imagenet-sample"
MAX_DURATION_S = 3600


@dataclass(frozen=True)
class Kind:
    """One kind of request: its share of the traffic, what it sends, the statuses it may get."""

    name: str
    weight: float
    build: Callable[[random.Random], dict[str, Any]]
    expect: frozenset[int]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kinds(images: list[bytes]) -> list[Kind]:
    pick = random.Random.choice
    ok = frozenset({200, 429})  # 429 is a correct answer under load

    def files(rng: random.Random, n: int) -> list[tuple[str, tuple[str, bytes]]]:
        out = [("reference", ("r.jpg", pick(rng, images)))]
        return out + [("candidate", (f"c{i}.jpg", pick(rng, images))) for i in range(n)]

    hostile = {
        "zero-byte": b"",
        "html": bad.HTML,
        "svg": bad.SVG,
        "truncated-jpeg": bad.truncated(images[0], 0.4),
        "corrupt-png": bad.corrupted_png_crc(),
        "png-bomb": bad.png_bomb(),
        "jpeg-bomb": bad.jpeg_bomb(),
    }
    hostile_list = list(hostile.values())
    expect_bad = frozenset({400, 413, 429})
    return [
        Kind("distance-multipart", 40, lambda r: {"files": files(r, r.randint(1, 4))}, ok),
        Kind(
            "distance-json",
            15,
            lambda r: {
                "json": {
                    "reference": b64(pick(r, images)),
                    "candidates": [b64(pick(r, images)) for _ in range(r.randint(1, 3))],
                    "per_layer": True,
                }
            },
            ok,
        ),
        Kind(
            "robustness-check",
            3,
            lambda r: {"files": files(r, 1), "data": {"steps": "3", "seed": str(r.randint(0, 99))}},
            ok,
        ),
        Kind(
            "bad-image",
            15,
            lambda r: {
                "files": [
                    ("reference", ("r.jpg", pick(r, images))),
                    ("candidate", ("c.jpg", pick(r, hostile_list))),
                ]
            },
            expect_bad,
        ),
        Kind(
            "bad-base64",
            4,
            lambda r: {"json": {"reference": "@@@", "candidates": [b64(images[0])]}},
            frozenset({400}),
        ),
        Kind(
            "bad-json",
            4,
            lambda r: {
                "content": b'{"reference": ',
                "headers": {"content-type": "application/json"},
            },
            frozenset({400}),
        ),
        Kind(
            "bad-fields",
            4,
            lambda r: {"files": files(r, 1), "data": {"threshold": "NaN", "model": "nope"}},
            frozenset({422}),
        ),
        Kind(
            "wrong-content-type",
            3,
            lambda r: {"content": b"hello", "headers": {"content-type": "text/plain"}},
            frozenset({415}),
        ),
        Kind(
            "oversize",
            2,
            lambda r: {
                "content": b"x" * (9 * 2**20),
                "headers": {"content-type": "application/json"},
            },
            frozenset({413}),
        ),
        Kind("models", 4, lambda r: {"method": "GET", "path": "/models"}, frozenset({200})),
        Kind("readyz", 3, lambda r: {"method": "GET", "path": "/readyz"}, frozenset({200})),
        Kind("metrics", 3, lambda r: {"method": "GET", "path": "/metrics"}, frozenset({200})),
    ]


PATHS = {"robustness-check": "/robustness-check"}


def proc_stats(pid: int) -> dict[str, float]:
    """RSS (MiB), threads and open file descriptors of a process (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=os.environ | env, stdout=out, stderr=subprocess.STDOUT
        )


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("server not ready")


@dataclass
class Tally:
    statuses: dict[str, Counter[int]]
    latencies: dict[str, list[float]]
    unexpected: list[str]
    transport_errors: int = 0


async def client_loop(
    url: str, mix: list[Kind], stop_at: float, tally: Tally, seed: int, timeout_s: float
) -> None:
    rng = random.Random(seed)
    weights = [k.weight for k in mix]
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        while time.monotonic() < stop_at:
            kind = rng.choices(mix, weights)[0]
            req = kind.build(rng)
            method, path = req.pop("method", "POST"), req.pop("path", None)
            path = path or PATHS.get(kind.name, "/distance")
            t0 = time.perf_counter()
            try:
                r = await client.request(method, path, **req)
            except httpx.TransportError as exc:
                tally.transport_errors += 1
                tally.unexpected.append(f"{kind.name}: {type(exc).__name__}")
                continue
            tally.latencies[kind.name].append(time.perf_counter() - t0)
            tally.statuses[kind.name][r.status_code] += 1
            if r.status_code not in kind.expect or "Traceback" in r.text:
                tally.unexpected.append(f"{kind.name}: {r.status_code} {r.text[:200]}")


async def sampler(pid: int, stop_at: float, every_s: float, out: list[dict[str, float]]) -> None:
    t0 = time.monotonic()
    while True:
        out.append({"t_s": round(time.monotonic() - t0, 1), **proc_stats(pid)})
        if time.monotonic() >= stop_at:
            return
        await asyncio.sleep(min(every_s, max(0.0, stop_at - time.monotonic())))


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    files = sorted(IMAGENET.glob("*.JPEG"))[:64]
    if len(files) < 8:
        raise SystemExit(f"need ImageNet samples in {IMAGENET}")
    images = [f.read_bytes() for f in files]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "RLPIPS_WEIGHTS_DIR": os.environ.get(
            "RLPIPS_WEIGHTS_DIR", str(ROOT.parent / "shared" / "weights")
        ),
        "RLPIPS_RESOLUTION": str(args.resolution),
        "RLPIPS_MAX_BODY_BYTES": str(8 * 2**20),
        "RLPIPS_MAX_ATTACK_STEPS": "10",
    }
    proc = start_server(port, env, args.log)
    try:
        await wait_ready(url, proc)
        mix = kinds(images)
        tally = Tally(defaultdict(Counter), defaultdict(list), [])
        samples: list[dict[str, float]] = []
        started = time.monotonic()
        stop_at = started + args.duration
        await asyncio.gather(
            sampler(proc.pid, stop_at, args.sample, samples),
            *(
                client_loop(url, mix, stop_at, tally, i, args.timeout)
                for i in range(args.concurrency)
            ),
        )
        wall = time.monotonic() - started
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            ready_after = (await client.get("/readyz")).status_code
            metrics_text = (await client.get("/metrics")).text
    finally:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code: int | None = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = None
        shutdown_s = time.monotonic() - t0
    log_text = args.log.read_text()
    rss = [s["rss_mib"] for s in samples]
    warm = rss[len(rss) // 10 :] or rss  # after the first tenth (warm-up)
    return {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.soak", *sys.argv[1:]]),
        "duration_s": round(wall, 1),
        "concurrency": args.concurrency,
        "resolution": args.resolution,
        "requests": sum(sum(c.values()) for c in tally.statuses.values()),
        "statuses": {k: dict(sorted(c.items())) for k, c in sorted(tally.statuses.items())},
        "latency_ms": {
            k: {"p50": round(1000 * quantile(v, 0.5), 1), "p95": round(1000 * quantile(v, 0.95), 1)}
            for k, v in sorted(tally.latencies.items())
        },
        "unexpected": len(tally.unexpected),
        "unexpected_examples": tally.unexpected[:10],
        "transport_errors": tally.transport_errors,
        "server_5xx_in_log": sum(
            f'HTTP/1.1" 5{d}' in line for line in log_text.splitlines() for d in "0123456789"
        ),
        "tracebacks_in_log": log_text.count("Traceback"),
        "rss_mib": {
            "start": rss[0],
            "max": max(rss),
            "end": rss[-1],
            "warm_min": min(warm),
            "warm_max": max(warm),
        },
        "samples": samples,
        "ready_after": ready_after,
        "rejected": {
            line.split('"')[1]: float(line.split()[-1])
            for line in metrics_text.splitlines()
            if line.startswith("rlpips_rejected_total{")
        },
        "shutdown_s": round(shutdown_s, 2),
        "exit_code": exit_code,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"- command: `{result['command']}`",
        f"- {result['requests']} requests in {result['duration_s']} s, {result['concurrency']} "
        f"clients, working resolution {result['resolution']}",
        f"- unexpected answers: {result['unexpected']} (transport errors "
        f"{result['transport_errors']}); 5xx in the server log: {result['server_5xx_in_log']}; "
        f"tracebacks: {result['tracebacks_in_log']}",
        f"- /readyz after the soak: {result['ready_after']}; SIGTERM to exit: "
        f"{result['shutdown_s']} s, exit code {result['exit_code']}",
        f"- rejected (server counters): {result['rejected']}",
        "",
        "| kind | statuses | p50 ms | p95 ms |",
        "|---|---|---|---|",
    ]
    for kind, statuses in result["statuses"].items():
        lat = result["latency_ms"][kind]
        codes = ", ".join(f"{c}: {n}" for c, n in statuses.items())
        lines.append(f"| {kind} | {codes} | {lat['p50']} | {lat['p95']} |")
    rss = result["rss_mib"]
    lines += [
        "",
        f"RSS (MiB): start {rss['start']:.0f}, max {rss['max']:.0f}, end {rss['end']:.0f}; "
        f"after warm-up between {rss['warm_min']:.0f} and {rss['warm_max']:.0f}",
        "",
        "| t (s) | RSS (MiB) | threads | open fds |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {s['t_s']:.0f} | {s['rss_mib']:.0f} | {s['threads']:.0f} | {s['fds']:.0f} |"
        for s in result["samples"]
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--sample", type=float, default=30.0, help="seconds between RSS samples")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request")
    p.add_argument("--log", type=Path, default=Path("soak-server.log"))
    p.add_argument("--json", type=Path, help="write the full result here")
    args = p.parse_args()
    if not 0 < args.duration <= MAX_DURATION_S:
        p.error(f"--duration must be in (0, {MAX_DURATION_S}]")
    result = asyncio.run(soak(args))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if result["unexpected"] or result["tracebacks_in_log"] else 0


if __name__ == "__main__":
    sys.exit(main())
