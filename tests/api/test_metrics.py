"""The operational metrics of issue 14 through the ASGI app (tiny random-weight store): every series
present from the start with its right value, and moving with real requests."""

from __future__ import annotations

import asyncio
import platform
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.telemetry import REJECT_REASONS
from tests.support.apiutil import (
    hold_device,
    jpegs,
    multipart,
    runtime,
    serve,
    tiny_settings,
    until,
)

Labels = frozenset[tuple[str, str]]


def samples(text: str) -> dict[tuple[str, Labels], float]:
    """Every sample of a scrape: ``(name, labels) → value`` (absent series are absent keys)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    """The value of one series, failing the test if the series is absent."""
    key = (name, frozenset(labels.items()))
    assert key in scraped, f"{name}{labels} absent"
    return scraped[key]


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, Labels], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    return samples(r.text)


async def test_every_series_is_there_before_any_work(tiny_store: Path) -> None:
    async with serve(tiny_settings(tiny_store)) as (client, _):
        r = await client.get("/metrics")
        text, m = r.text, samples(r.text)
    for reason in REJECT_REASONS:
        assert value(m, "rlpips_rejected_total", reason=reason) == 0
    assert "_created" not in text
    assert value(m, "process_resident_memory_bytes") > 0
    assert value(m, "process_start_time_seconds") > 0
    assert any(name == "python_info" for name, _ in m)
    assert value(m, "rlpips_ready") == 1 and value(m, "rlpips_draining") == 0
    assert value(m, "rlpips_attacks_running") == 0 and value(m, "rlpips_inflight_pairs") == 0
    assert value(m, "rlpips_inflight_requests", endpoint="/distance") == 0
    assert value(m, "rlpips_inflight_requests", endpoint="/metrics") == 1  # this scrape
    assert value(m, "rlpips_cache_entries") == 0 and value(m, "rlpips_cache_bytes") == 0
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu",
        "precision": "float32",
        "default_model": "lpips-alex",
    }
    [(_, labels)] = [k for k in m if k[0] == "rlpips_build_info"]
    assert dict(labels).items() >= info.items() and dict(labels)["version"]
    assert value(m, "rlpips_build_info", **dict(labels)) == 1


async def test_distance_histogram_and_cache_follow_the_requests(tiny_store: Path) -> None:
    imgs = jpegs(6)
    async with serve(tiny_settings(tiny_store)) as (client, _):
        returned: list[float] = []
        for request in (imgs[:2], imgs[2:6], [imgs[0], imgs[5]]):  # 1 + 3 + 1 pairs, 2 references
            r = await client.post("/distance", files=multipart(*request))
            assert r.status_code == 200, r.text
            returned += [p["distance"] for p in r.json()["results"]]
        m = await scrape(client)
    assert value(m, "rlpips_distance_count", model="lpips-alex") == len(returned) == 5
    assert value(m, "rlpips_pairs_total", model="lpips-alex") == 5
    assert value(m, "rlpips_distance_sum", model="lpips-alex") == pytest.approx(sum(returned))
    below = sum(d <= 0.5 for d in returned)
    assert value(m, "rlpips_distance_bucket", model="lpips-alex", le="0.5") == below
    assert value(m, "rlpips_cache_entries") == 2  # imgs[0] (asked twice) and imgs[2]
    assert value(m, "rlpips_cache_bytes") > 0
    assert value(m, "rlpips_inflight_pairs") == 0
    assert value(m, "rlpips_inflight_requests", endpoint="/distance") == 0


async def test_inflight_gauges_count_work_until_it_is_answered(tiny_store: Path) -> None:
    imgs = jpegs(4)
    async with serve(tiny_settings(tiny_store, max_wait_ms=0)) as (client, app):
        rt = runtime(app)
        gate = hold_device(rt)
        try:
            pending = asyncio.ensure_future(client.post("/distance", files=multipart(*imgs)))
            await until(lambda: rt.worker.backlog == 1)  # its batch waits for the held device
            during = await scrape(client)
        finally:
            gate.set()
        assert (await pending).status_code == 200
        after = await scrape(client)
    assert value(during, "rlpips_inflight_pairs") == 3
    assert value(during, "rlpips_inflight_requests", endpoint="/distance") == 1
    assert value(after, "rlpips_inflight_pairs") == 0
    assert value(after, "rlpips_inflight_requests", endpoint="/distance") == 0


async def test_attacks_running_counts_a_robustness_check(tiny_store: Path) -> None:
    ref = jpegs(1)[0]
    async with serve(tiny_settings(tiny_store)) as (client, app):
        rt = runtime(app)
        gate = hold_device(rt)
        try:
            files = [("reference", ("r.jpg", ref))]
            data = {"steps": "2", "models": "lpips-alex"}
            pending = asyncio.ensure_future(
                client.post("/robustness-check", files=files, data=data)
            )
            await until(lambda: rt.jobs.active == 1)
            during = await scrape(client)
        finally:
            gate.set()
        assert (await pending).status_code == 200
        after = await scrape(client)
    assert value(during, "rlpips_attacks_running") == 1
    assert value(after, "rlpips_attacks_running") == 0


async def test_draining_and_ready_follow_the_runtime(tiny_store: Path) -> None:
    async with serve(tiny_settings(tiny_store)) as (client, app):
        rt = runtime(app)
        rt.draining = True
        try:
            assert (await client.get("/readyz")).status_code == 503
            m = await scrape(client)
        finally:
            rt.draining = False
        assert value(m, "rlpips_draining") == 1 and value(m, "rlpips_ready") == 0
        assert (await client.get("/readyz")).status_code == 200
        m = await scrape(client)
        assert value(m, "rlpips_draining") == 0 and value(m, "rlpips_ready") == 1
