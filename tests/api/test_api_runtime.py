"""The API under pressure (ASGI): 429 overload, 504 deadline, client disconnects, worker death,
draining (on the tiny random-weight store) — and agreement with ``rlpips distance --resolution 256``
(real weights)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from app.cli.main import main as cli_main
from tests.support.apiutil import (
    IMAGENET,
    call_then_disconnect,
    hold_device,
    jpegs,
    metric,
    multipart,
    runtime,
    serve,
    settings,
    tiny_settings,
    until,
)


async def test_full_queue_answers_429_with_retry_after(tiny_store: Path) -> None:
    imgs = jpegs(3)
    async with serve(tiny_settings(tiny_store, queue_size=2, max_wait_ms=0)) as (client, app):
        rt = runtime(app)
        gate = hold_device(rt)
        try:
            first = asyncio.ensure_future(client.post("/distance", files=multipart(*imgs[:2])))
            await until(lambda: rt.worker.backlog == 1)  # first is waiting for the held device
            queued = asyncio.ensure_future(client.post("/distance", files=multipart(*imgs)))
            await until(lambda: rt.batcher.depth == 2)
            r = await client.post("/distance", files=multipart(*imgs[:2]))
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "overloaded"
            assert int(r.headers["retry-after"]) >= 1
        finally:
            gate.set()
        assert (await first).status_code == 200 and (await queued).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "rlpips_rejected_total", reason="overloaded") == 1
        assert metric(text, "rlpips_requests_total", endpoint="/distance", status="429") == 1


async def test_deadline_gives_504_and_the_work_never_runs(tiny_store: Path) -> None:
    imgs = jpegs(2)
    async with serve(tiny_settings(tiny_store, deadline_s=1.0, max_wait_ms=0)) as (client, app):
        rt = runtime(app)
        gate = hold_device(rt)
        try:
            first = asyncio.ensure_future(client.post("/distance", files=multipart(*imgs)))
            await until(lambda: rt.worker.backlog == 1)  # first waits for the held device
            r = await client.post("/distance", files=multipart(imgs[1], imgs[0]))
        finally:
            gate.set()
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert (await first).status_code == 504  # it waited for the held device past its deadline
        await until(lambda: rt.worker.backlog == 0)  # `first`'s batch reached the free device ...
        text = (await client.get("/metrics")).text
        assert metric(text, "rlpips_rejected_total", reason="deadline") == 2
        assert metric(text, "rlpips_pairs_total", model="lpips-alex") == 0  # ... and was skipped
        assert metric(text, "rlpips_batch_size_count") == 0


async def test_disconnected_client_is_skipped_and_counted(tiny_store: Path) -> None:
    imgs = jpegs(2)
    async with serve(tiny_settings(tiny_store, max_wait_ms=0)) as (client, app):
        rt = runtime(app)
        gate = hold_device(rt)
        filler = asyncio.ensure_future(client.post("/distance", files=multipart(*imgs)))
        await until(lambda: rt.worker.backlog == 1)  # the next request will stay queued
        request = httpx.Request("POST", "http://test/distance", files=multipart(imgs[1], imgs[0]))
        gone = asyncio.Event()
        call, sent = call_then_disconnect(app, request, gone)
        await until(lambda: rt.batcher.depth == 1)
        gone.set()
        await asyncio.wait_for(call, 10)
        assert rt.batcher.depth == 0
        gate.set()
        assert (await filler).status_code == 200
        assert sent[0]["status"] == 499
        text = (await client.get("/metrics")).text
        assert metric(text, "rlpips_rejected_total", reason="cancelled") == 1
        assert (
            metric(text, "rlpips_pairs_total", model="lpips-alex") == 1
        )  # never reached the model


async def test_worker_death_and_draining_turn_readiness_off(tiny_store: Path) -> None:
    imgs = jpegs(2)
    async with serve(tiny_settings(tiny_store)) as (client, app):
        rt = runtime(app)
        assert (await client.get("/readyz")).status_code == 200
        rt.worker.stop(timeout_s=10)
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        r = await client.post("/distance", files=multipart(*imgs))
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        rt.draining = True
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        assert (await client.get("/healthz")).status_code == 200


def test_http_agrees_with_the_cli_at_256(
    weights_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = sorted(IMAGENET.glob("*.JPEG"))[10:13]
    cli = []
    for f in files[1:]:
        assert cli_main(["distance", str(files[0]), str(f), "--resolution", "256", "--json"]) == 0
        cli.append(json.loads(capsys.readouterr().out)["distance"])

    async def over_http() -> list[float]:
        # the store's default model, as the CLI uses
        s = settings(weights_dir, resolution=256, default_model=None)
        async with serve(s) as (client, _):
            data = [f.read_bytes() for f in files]
            r = await client.post("/distance", files=multipart(*data))
            assert r.status_code == 200 and r.json()["resolution"] == [256, 256]
            return [x["distance"] for x in r.json()["results"]]

    http = asyncio.run(over_http())
    assert http == pytest.approx(cli, abs=1e-4)
    assert min(cli) > 0.1


def test_jpeg_draft_setting_reaches_decoding(tiny_store: Path) -> None:
    """``RLPIPS_JPEG_DRAFT`` is off by default (full decode) and, when on, decodes like
    ``load_tensor(..., draft=True)``."""
    from app.imaging import load_tensor
    from app.serving.runtime import Runtime
    from app.telemetry import Telemetry

    data = (IMAGENET / sorted(p.name for p in IMAGENET.glob("*.JPEG"))[0]).read_bytes()
    for draft in (False, True):
        s = tiny_settings(tiny_store, **({"jpeg_draft": True} if draft else {}))
        rt = Runtime(s, s.store(), Telemetry())
        try:
            got = asyncio.run(rt.decode([("image", data)], 30))[0].tensor
        finally:
            rt.decoder.shutdown()
        assert torch.equal(got, load_tensor(data, 64, draft=draft))
    assert not torch.equal(load_tensor(data, 64, draft=True), load_tensor(data, 64))
