"""The end-to-end parts of the device check (:mod:`benchmarks.gpu_check`): ``rlpips serve`` processes on
the device driven by load-generator processes with real JPEG uploads.

:func:`service` measures one replica at several concurrency levels; :func:`replicas` measures the serving
shape issue 15 asks about — K replica processes sharing one device, each with its own HTTP parsing,
decode threads and micro-batcher (one process per replica, as behind the load balancer), the clients
spread over them — at one concurrency level per K.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_check")
#: A started server: its URL and process.
Server = tuple[str, "subprocess.Popen[bytes]"]


def _settings(shared: Path, dry: bool) -> dict[str, str]:
    return {
        "RLPIPS_WEIGHTS_DIR": str(shared / "weights"),
        "RLPIPS_DEVICE": "cpu" if dry else "cuda",
        "RLPIPS_RESOLUTION": "64" if dry else "256",
        "RLPIPS_MAX_BATCH_PAIRS": "32" if dry else "256",
        "RLPIPS_MAX_WAIT_MS": "0" if dry else "2",
        "RLPIPS_CACHE_ENTRIES": "0",
        "RLPIPS_QUEUE_SIZE": "4096",
    }


@contextmanager
def _server(env: dict[str, str], settings: dict[str, str], log_path: Path) -> Iterator[Server]:
    """One ``rlpips serve`` on a free loopback port (not yet ready); terminated on exit."""
    from benchmarks.soak import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as server_log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | env | settings, stdout=server_log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(60)


def service(
    shared: Path,
    env: dict[str, str],
    dry: bool,
    levels: list[tuple[int, int]],
    seconds: float,
    out: Path,
) -> dict[str, Any]:
    """``rlpips serve`` on the device with real JPEG uploads from ``clients`` processes per level."""
    settings = _settings(shared, dry)
    results: dict[str, Any] = {"settings": settings, "levels": []}
    with _server(env, settings, out / "server.log") as server:
        _wait_ready([server])
        url = server[0]
        for clients, concurrency in levels:
            results["levels"].append(_level([url], env, clients, concurrency, seconds))
            log.info("service level %s", results["levels"][-1])
    return results


def replicas(
    shared: Path,
    env: dict[str, str],
    dry: bool,
    counts: tuple[int, ...],
    level: tuple[int, int],
    seconds: float,
    out: Path,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """For each K in ``counts``: K replicas on the device, ``level`` = (client processes, connections)
    spread round-robin over them; pairs/s and latency per K. ``extra``: settings on top (e.g.
    ``RLPIPS_DECODE_DEVICE``)."""
    settings = _settings(shared, dry) | (extra or {})
    results: dict[str, Any] = {"settings": settings, "level": list(level), "shapes": []}
    for k in counts:
        with ExitStack() as stack:
            servers = [
                stack.enter_context(_server(env, settings, out / f"replica-{k}-{i}.log"))
                for i in range(k)
            ]
            _wait_ready(servers)
            urls = [url for url, _ in servers]
            clients, concurrency = level
            shape = {"replicas": k, **_level(urls, env, max(clients, k), concurrency, seconds)}
            results["shapes"].append(shape)
            log.info("replicas %s", shape)
    return results


def _wait_ready(servers: list[Server], timeout_s: float = 300) -> None:
    import httpx

    end = time.monotonic() + timeout_s
    waiting = list(servers)
    while waiting and time.monotonic() < end:
        for server in list(waiting):
            url, proc = server
            if proc.poll() is not None:
                raise RuntimeError(f"server {url} exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    waiting.remove(server)
            except httpx.TransportError:
                pass
        time.sleep(0.3)
    if waiting:
        raise RuntimeError(f"not ready after {timeout_s} s: {[url for url, _ in waiting]}")


def _level(
    urls: list[str], env: dict[str, str], clients: int, concurrency: int, seconds: float
) -> dict[str, Any]:
    """``clients`` load-generator processes (client ``i`` on ``urls[i % len(urls)]``),
    ``concurrency`` connections in all, real JPEG pairs."""
    per = max(1, concurrency // clients)
    procs = []
    for i in range(clients):
        cmd = [sys.executable, "-m", "benchmarks.loadgen", "--url", urls[i % len(urls)],
               "--concurrency", str(per), "--duration", str(seconds),
               "--warmup", str(min(3.0, seconds))]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=os.environ | env, stdout=subprocess.PIPE,
                                      text=True))  # fmt: skip
    reports = [json.loads(p.communicate(timeout=seconds * 4 + 120)[0]) for p in procs]
    return {
        "clients": clients,
        "concurrency": per * clients,
        "pairs_per_s": round(sum(r["pairs_per_s"] for r in reports), 1),
        "errors": sum(r["errors"] for r in reports),
        "p50_ms_max": max(r["p50_ms"] for r in reports),
        "p99_ms_max": max(r["p99_ms"] for r in reports),
    }
