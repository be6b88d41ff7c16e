"""End to end against a real ``rlpips serve`` (uvicorn) process on 127.0.0.1 with a free port."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.apiutil import jpegs, metric, multipart
from tests.support.serverutil import Server, running

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("e2e") / "server.log"
    env = {
        "RLPIPS_RESOLUTION": "64",
        "RLPIPS_MODELS": "lpips-alex",
        "RLPIPS_DEFAULT_MODEL": "lpips-alex",
        "RLPIPS_MAX_WAIT_MS": "10",
        "RLPIPS_DRAIN_S": "2",  # the drain period this module was written for (default 10 s)
    }
    with running(weights_dir, log, env) as srv:
        yield srv


def test_request_and_metrics(server: Server) -> None:
    ref, cand = jpegs(2, start=20)
    r = httpx.post(f"{server.url}/distance", files=multipart(ref, cand, ref), timeout=60)
    assert r.status_code == 200, r.text
    d = [x["distance"] for x in r.json()["results"]]
    assert d[0] > 0.05 and d[1] == pytest.approx(0.0, abs=1e-6)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert metric(text, "rlpips_requests_total", endpoint="/distance", status="200") >= 1
    assert metric(text, "rlpips_pairs_total", model="lpips-alex") >= 2
    assert metric(text, "rlpips_batch_size_count") >= 1
    direct = httpx.get(f"{server.url}/metrics", timeout=10)  # a plain route: 200, no redirect
    assert direct.status_code == 200 and not direct.history


def test_48_concurrent_requests_form_batches(server: Server) -> None:
    imgs = jpegs(12, start=30)
    before = httpx.get(f"{server.url}/metrics", timeout=10).text

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=48)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(
                *(
                    client.post("/distance", files=multipart(imgs[i % 12], imgs[(i + 5) % 12]))
                    for i in range(48)
                )
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 48
    after = httpx.get(f"{server.url}/metrics", timeout=10).text
    pairs = metric(after, "rlpips_batch_size_sum") - metric(before, "rlpips_batch_size_sum")
    batches = metric(after, "rlpips_batch_size_count") - metric(before, "rlpips_batch_size_count")
    assert pairs == 48
    assert pairs / batches > 1.5, f"mean batch size {pairs / batches:.2f}"


def test_sigterm_exits_cleanly(server: Server) -> None:
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    log = server.log.read_text()
    assert "Traceback" not in log
    assert "Application shutdown complete" in log
