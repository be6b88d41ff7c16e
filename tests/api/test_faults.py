"""Device faults, injected through the runtime's test hook (``Runtime.fault_hook``, called on the device
thread with each distance batch): one failed batch fails only its requests with a logged ``error_id``;
out-of-memory batches are split and retried; repeated failure turns readiness off until the device works
again (on the tiny random-weight store: distances are only compared with each other)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest
import torch

from app.metric.queries import Query
from tests.support.apiutil import hold_device, multipart, runtime, serve, tiny_settings, until
from tests.support.badinputs import gradient, jpeg, png_of

A, B, C = jpeg(), png_of(gradient(40, 40).rotate(90)), png_of(gradient(20, 60))


class Recorder:
    """A fault hook: records the size (pairs) of every batch, raises what ``fail`` says."""

    def __init__(self, fail: type[Exception] | None = None, when_over: int = 0) -> None:
        self.sizes: list[int] = []
        self.fail = fail
        self.when_over = when_over  # raise only for batches of more than this many pairs
        self.lock = threading.Lock()

    def __call__(self, queries: list[Query]) -> None:
        pairs = sum(q.pairs for q in queries)
        with self.lock:
            self.sizes.append(pairs)
        if self.fail is not None and pairs > self.when_over:
            raise self.fail(f"injected fault in a batch of {pairs} pairs")


async def test_a_failing_batch_fails_only_its_requests(
    tiny_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = tiny_settings(tiny_store, max_wait_ms=0)
    async with serve(s) as (client, app):
        rt = runtime(app)
        hook = Recorder(RuntimeError, when_over=1)  # 2-pair batches fail, 1-pair batches pass
        rt.fault_hook = hook
        gate = hold_device(rt)  # line the requests up: one batch each
        with caplog.at_level(logging.INFO):
            try:
                one = asyncio.ensure_future(client.post("/distance", files=multipart(A, B)))
                await until(lambda: rt.worker.backlog == 1)
                two = asyncio.ensure_future(client.post("/distance", files=multipart(A, B, C)))
                await until(lambda: rt.batcher.depth == 2)
                # `two` is next: the collector waits for `one`'s batch before taking it
            finally:
                gate.set()
            one, two = await one, await two
            three = await client.post("/distance", files=multipart(C, A))
        assert one.status_code == 200 and three.status_code == 200, (one.text, three.text)
        assert two.status_code == 500, two.text
        err = two.json()["error"]
        assert err["code"] == "internal_error" and "Traceback" not in two.text
        assert "injected" not in two.text  # internals stay in the log
        logged = [r for r in caplog.records if err["error_id"] in r.getMessage()]
        assert len(logged) == 1 and logged[0].levelno == logging.ERROR
        assert "POST /distance" in logged[0].getMessage()
        trace = caplog.text
        assert "injected fault in a batch of 2 pairs" in trace
        assert "in a device batch of 1 items" in trace  # the context note on the exception
        assert hook.sizes == [1, 2, 1]
        rt.fault_hook = None
        assert (await client.get("/readyz")).status_code == 200
        again = await client.post("/distance", files=multipart(A, B, C))
        assert again.status_code == 200, again.text


async def test_out_of_memory_splits_the_batch_and_retries(tiny_store: Path) -> None:
    candidates = [A, B, C, A]
    s = tiny_settings(tiny_store, max_batch_pairs=4, max_wait_ms=1000)  # flushes when 4 pairs wait
    async with serve(s) as (client, app):
        rt = runtime(app)
        clean = [
            (await client.post("/distance", files=multipart(B, c))).json()["results"][0]
            for c in candidates
        ]
        hook = Recorder(torch.cuda.OutOfMemoryError, when_over=1)  # only single pairs fit
        rt.fault_hook = hook
        answers = await asyncio.gather(
            *(client.post("/distance", files=multipart(B, c)) for c in candidates)
        )
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        got = [r.json()["results"][0]["distance"] for r in answers]
        assert got == pytest.approx([c["distance"] for c in clean], abs=1e-5)
        # one batch of 4 was tried, then halves, then quarters: the fault hook saw each attempt
        assert hook.sizes == [4, 2, 1, 1, 2, 1, 1], hook.sizes
        assert rt.batcher.failures == 0

        hook.sizes.clear()
        r = await client.post("/distance", files=multipart(B, A, C))  # one request, 2 pairs
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert hook.sizes == [2]  # a single request cannot be split further: it fails
        assert (await client.get("/readyz")).status_code == 200


async def test_repeated_failure_turns_readiness_off_until_the_device_recovers(
    tiny_store: Path,
) -> None:
    s = tiny_settings(tiny_store, max_wait_ms=0, max_batch_failures=3)
    async with serve(s) as (client, app):
        rt = runtime(app)
        hook = Recorder(RuntimeError)
        rt.fault_hook = hook
        for i in range(3):
            assert (await client.get("/readyz")).status_code == 200, f"after {i} failures"
            r = await client.post("/distance", files=multipart(A, B))
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        r = await client.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "not_ready" and "3" in r.json()["error"]["message"]
        await until(lambda: len(hook.sizes) == 4)  # /readyz sent a probe; it failed too
        assert (await client.get("/readyz")).status_code == 503
        rt.fault_hook = None  # the device works again
        r = await client.post("/distance", files=multipart(A, B))
        assert r.status_code == 200, r.text
        assert (await client.get("/readyz")).status_code == 200


async def test_readiness_probe_recovers_without_traffic(
    tiny_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.serving.runtime.PROBE_EVERY_S", 0.0)
    s = tiny_settings(tiny_store, max_wait_ms=0, max_batch_failures=1)
    async with serve(s) as (client, app):
        rt = runtime(app)
        rt.fault_hook = Recorder(RuntimeError)
        assert (await client.post("/distance", files=multipart(A, B))).status_code == 500
        assert (await client.get("/readyz")).status_code == 503
        rt.fault_hook = None
        ready = 0
        for _ in range(200):  # only /readyz calls: their probes must bring readiness back
            ready = (await client.get("/readyz")).status_code
            if ready == 200:
                break
            await asyncio.sleep(0.02)
        assert ready == 200
