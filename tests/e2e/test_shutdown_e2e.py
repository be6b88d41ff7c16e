"""Graceful shutdown of a real ``rlpips serve`` (uvicorn) process: on SIGTERM readiness turns off at
once, new work gets 503 ``draining``, every request already taken (in flight or queued) completes, and
the process exits cleanly within its grace period."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.support.apiutil import jpegs, metric, multipart
from tests.support.serverutil import Server, launch, wait_ready

pytestmark = pytest.mark.e2e

GRACE_S, DRAIN_S = 20.0, 1.5


def start(weights_dir: Path, log: Path, grace_s: float = GRACE_S, **env: str) -> Server:
    env = {
        "RLPIPS_MODELS": "lpips-alex",
        "RLPIPS_MAX_WAIT_MS": "10",
        "RLPIPS_DRAIN_S": str(DRAIN_S),
        **env,
    }
    return launch(weights_dir, log, env, ["--grace", str(grace_s)])


def test_sigterm_drains_and_loses_no_accepted_request(weights_dir: Path, tmp_path: Path) -> None:
    # 224 px on CPU: the burst below keeps the device busy for a few seconds
    server = start(weights_dir, tmp_path / "server.log", RLPIPS_RESOLUTION="224")
    try:
        wait_ready(server)
        sigterm_at = asyncio.run(_drain_scenario(server))
        code = server.proc.wait(GRACE_S + 5)
        exited_after = time.monotonic() - sigterm_at
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)
    log = server.log.read_text()
    assert code == 0, log
    assert "Traceback" not in log and "draining" in log
    assert exited_after < GRACE_S


async def _drain_scenario(server: Server) -> float:
    """The burst, SIGTERM, the checks while draining; returns when SIGTERM was sent (monotonic)."""
    imgs = jpegs(10, start=40)
    n_requests, per_request = 24, 4
    async with httpx.AsyncClient(
        base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=64)
    ) as client:
        burst = [
            asyncio.ensure_future(
                client.post(
                    "/distance",
                    files=multipart(*(imgs[(i + k) % 10] for k in range(per_request + 1))),
                )
            )
            for i in range(n_requests)
        ]
        # SIGTERM once every request of the burst was taken (all decoded) and work is still queued
        while True:
            text = (await client.get("/metrics")).text
            decoded = metric(text, "rlpips_decode_duration_seconds_count")
            if decoded >= n_requests * (per_request + 1):
                break
            assert not all(f.done() for f in burst), "the burst finished before SIGTERM"
            await asyncio.sleep(0.02)
        assert metric(text, "rlpips_queue_depth") > 0, "nothing queued at SIGTERM"
        server.proc.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        await asyncio.sleep(0.2)
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
        late = await client.post("/distance", files=multipart(imgs[0], imgs[1]))
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        assert not all(f.done() for f in burst), "the burst finished before the drain was checked"
        answers = await asyncio.gather(*burst)
    assert [r.status_code for r in answers] == [200] * n_requests, [
        r.text for r in answers if r.status_code != 200
    ]
    assert all(len(r.json()["results"]) == per_request for r in answers)
    return sigterm_at


def test_shutdown_is_bounded_by_the_grace_period(weights_dir: Path, tmp_path: Path) -> None:
    """Work that cannot finish in time does not hold the process past ``--grace``."""
    grace_s = 4.0
    server = start(
        weights_dir,
        tmp_path / "server.log",
        grace_s,
        RLPIPS_RESOLUTION="64",
        RLPIPS_DEADLINE_S="600",
        RLPIPS_MAX_ATTACK_STEPS="100000",
    )
    try:
        wait_ready(server)
        asyncio.run(_long_attack_then_sigterm(server))
        t0 = time.monotonic()
        server.proc.wait(grace_s + 5)
        elapsed = time.monotonic() - t0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)
    log = server.log.read_text()
    assert elapsed < grace_s + 1, f"exited {elapsed:.1f} s after SIGTERM (grace {grace_s} s)"
    assert "graceful shutdown exceeded" in log or "exiting now" in log, log


async def _long_attack_then_sigterm(server: Server) -> None:
    ref = jpegs(1, start=60)[0]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        job = asyncio.ensure_future(
            client.post("/robustness-check", files=multipart(ref), data={"steps": "100000"})
        )
        while 'kind="attack"' not in (await client.get("/metrics")).text:
            await asyncio.sleep(0.05)  # the long attack is running
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(job, return_exceptions=True)  # cut off: no answer, or an error
