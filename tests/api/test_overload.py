"""Overload, deadlines and cancellation through the ASGI app, with the device slowed or held by the
runtime's test hook: far more load than capacity gets only 200 or 429, the queue and memory stay bounded,
expired and abandoned work never reaches the device, and the service recovers at once (on the tiny
random-weight store: no assertion here depends on distance values)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.metric.queries import Query
from tests.support.apiutil import (
    call_then_disconnect,
    hold_device,
    metric,
    multipart,
    runtime,
    serve,
    tiny_settings,
    until,
)
from tests.support.badinputs import gradient, jpeg, png_of

IMAGES = [
    jpeg(),
    png_of(gradient(40, 40).rotate(90)),
    png_of(gradient(20, 60)),
    jpeg(gradient(64, 8)),
]


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class SlowDevice:
    """A fault hook that makes each distance batch take ``delay_s`` longer and counts what it sees."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches = 0
        self.pairs = 0
        self.references: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, queries: list[Query]) -> None:
        with self.lock:
            self.batches += 1
            self.pairs += sum(q.pairs for q in queries)
            self.references += [q.reference.key for q in queries]
        time.sleep(self.delay_s)


async def test_overload_gets_only_200_or_429_and_recovers_at_once(tiny_store: Path) -> None:
    queue_size, deadline_s = 6, 3.0
    s = tiny_settings(
        tiny_store, queue_size=queue_size, max_batch_pairs=3, max_wait_ms=1, deadline_s=deadline_s
    )
    async with serve(s) as (client, app):
        rt = runtime(app)
        device = SlowDevice(delay_s=0.02)  # at most ~150 pairs/s, whatever the CPU
        rt.fault_hook = device
        depths: list[int] = []
        gauges: list[float] = []
        rss: list[int] = [rss_bytes()]
        results: list[tuple[int, float, httpx.Response]] = []
        stop = time.monotonic() + 4.0

        async def user(i: int) -> None:
            while time.monotonic() < stop and len(results) < 3000:
                files = multipart(IMAGES[i % 4], *IMAGES[: 1 + i % 2])
                t0 = time.perf_counter()
                r = await client.post("/distance", files=files)
                results.append((r.status_code, time.perf_counter() - t0, r))

        async def sample() -> None:
            n = 0
            while time.monotonic() < stop:
                depths.append(rt.batcher.depth)
                if n % 25 == 0:
                    gauges.append(metric(rt.telemetry.render().decode(), "rlpips_queue_depth"))
                    rss.append(rss_bytes())
                n += 1
                await asyncio.sleep(0.002)

        await asyncio.gather(sample(), *(user(i) for i in range(48)))
        statuses = [code for code, _, _ in results]
        ok = [t for code, t, _ in results if code == 200]
        refused = [r for code, _, r in results if code == 429]
        assert set(statuses) == {200, 429}, sorted(set(statuses))
        assert len(refused) > len(ok), f"{len(ok)} accepted, {len(refused)} refused: not overloaded"
        for r in refused:
            assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        assert max(depths) <= queue_size and max(gauges) <= queue_size
        assert max(depths) >= queue_size - 1, "the queue never filled: the test offered too little"
        assert max(ok) <= deadline_s, f"slowest accepted request took {max(ok):.2f} s"
        growth = max(rss) - rss[0]
        assert growth < 150 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB under overload"
        text = (await client.get("/metrics")).text
        assert metric(text, "rlpips_rejected_total", reason="overloaded") == len(refused)
        # recovery: the very next request is served at once (no backlog left to wait behind)
        r = await client.post("/distance", files=multipart(IMAGES[0], IMAGES[1]))
        assert r.status_code == 200, r.text
        assert r.json()["timing_ms"]["queue"] < 500, r.json()["timing_ms"]
        assert (await client.get("/readyz")).status_code == 200
        assert rt.batcher.depth == 0


async def test_expired_requests_get_504_and_never_reach_the_device(tiny_store: Path) -> None:
    s = tiny_settings(tiny_store, deadline_s=0.5, max_wait_ms=0)
    async with serve(s) as (client, app):
        rt = runtime(app)
        device = SlowDevice()
        rt.fault_hook = device
        gate = hold_device(rt)  # a long batch occupies the device
        try:
            t0 = time.perf_counter()
            waiting = await asyncio.gather(
                *(client.post("/distance", files=multipart(IMAGES[i], IMAGES[3])) for i in range(3))
            )
            waited = time.perf_counter() - t0
        finally:
            gate.set()
        for r in waiting:
            assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert waited < 2.0, f"the 504s came {waited:.2f} s after a 0.5 s deadline"
        r = await client.post("/distance", files=multipart(IMAGES[1], IMAGES[2]))
        assert r.status_code == 200, r.text
        assert device.batches == 1 and device.pairs == 1  # only the last request ran
        text = (await client.get("/metrics")).text
        assert metric(text, "rlpips_rejected_total", reason="deadline") == 3


async def test_deadline_during_inference_answers_at_the_deadline(tiny_store: Path) -> None:
    s = tiny_settings(tiny_store, deadline_s=0.5, max_wait_ms=0)
    async with serve(s) as (client, app):
        runtime(app).fault_hook = SlowDevice(delay_s=2.0)
        t0 = time.perf_counter()
        r = await client.post("/distance", files=multipart(IMAGES[0], IMAGES[1]))
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert time.perf_counter() - t0 < 1.5


async def test_attack_jobs_past_their_deadline_never_take_a_step(tiny_store: Path) -> None:
    s = tiny_settings(tiny_store, attack_deadline_s=0.5)
    async with serve(s) as (client, app):
        rt = runtime(app)
        gate = hold_device(rt)
        try:
            r = await client.post(
                "/robustness-check", files=multipart(IMAGES[0]), data={"steps": "5"}
            )
        finally:
            gate.set()
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        await until(lambda: rt.worker.backlog == 0)
        text = (await client.get("/metrics")).text
        assert metric(text, "rlpips_inference_duration_seconds_count", kind="attack") == 0
        assert metric(text, "rlpips_rejected_total", reason="deadline") == 1


@pytest.mark.parametrize("endpoint", ["/distance", "/robustness-check"])
async def test_a_client_that_disconnects_has_its_work_dropped(
    tiny_store: Path, endpoint: str
) -> None:
    s = tiny_settings(
        tiny_store, max_wait_ms=0, max_attack_steps=1000, deadline_s=60, attack_deadline_s=60
    )
    async with serve(s) as (client, app):
        rt = runtime(app)
        device = SlowDevice()
        rt.fault_hook = device
        data = {"steps": "1000"} if endpoint == "/robustness-check" else {}
        request = httpx.Request(
            "POST", f"http://test{endpoint}", files=multipart(*IMAGES[:2]), data=data
        )
        gate = hold_device(rt)
        gone = asyncio.Event()
        call, sent = call_then_disconnect(app, request, gone)
        await until(lambda: rt.worker.backlog == 1)  # the request's work waits for the device
        gone.set()
        await asyncio.wait_for(call, 10)
        gate.set()
        await until(lambda: rt.worker.backlog == 0)
        assert sent[0]["status"] == 499
        assert device.batches == 0  # the distance batch never ran
        text = (await client.get("/metrics")).text
        assert metric(text, "rlpips_rejected_total", reason="cancelled") == 1
        assert metric(text, "rlpips_inference_duration_seconds_count", kind="attack") <= 1
        assert (await client.get("/readyz")).status_code == 200


async def test_full_queue_and_full_attack_slots_refuse_before_decoding(tiny_store: Path) -> None:
    s = tiny_settings(
        tiny_store,
        queue_size=1,
        max_attack_jobs=1,
        max_wait_ms=0,
        deadline_s=30,
        attack_deadline_s=30,
    )
    async with serve(s) as (client, app):
        rt = runtime(app)
        gate = hold_device(rt)
        try:
            running = asyncio.ensure_future(client.post("/distance", files=multipart(*IMAGES[:2])))
            await until(lambda: rt.worker.backlog == 1)
            queued = asyncio.ensure_future(client.post("/distance", files=multipart(*IMAGES[:2])))
            attack = asyncio.ensure_future(
                client.post("/robustness-check", files=multipart(IMAGES[0]), data={"steps": "1"})
            )
            await until(lambda: rt.batcher.depth == 1 and rt.jobs.active == 1)
            decoded = metric(rt.telemetry.render().decode(), "rlpips_decode_duration_seconds_count")
            broken = b"not an image"  # would be a 400 if it were decoded
            for endpoint in ("/distance", "/robustness-check"):
                r = await client.post(endpoint, files=multipart(broken, broken))
                assert r.status_code == 429, r.text
            after = metric(rt.telemetry.render().decode(), "rlpips_decode_duration_seconds_count")
            assert after == decoded
        finally:
            gate.set()
        assert [(await f).status_code for f in (running, queued, attack)] == [200, 200, 200]
