"""The HTTP API through the ASGI app (lifespan run): every endpoint, both encodings, every error body.

On the tiny random-weight store: the service must give what the plain metric gives with the same
weights, whatever those are (agreement with real LPIPS values is tested in ``tests/unit`` and by
``test_api_runtime.py::test_http_agrees_with_the_cli_at_256``)."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import torch
from fastapi import FastAPI
from PIL import Image

from app.imaging import load_tensor
from app.metric.store import ModelStore
from tests.support import tinystore as tiny
from tests.support.apiutil import jpegs, metric, multipart, png, runtime, serve, tiny_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

Client = tuple[httpx.AsyncClient, FastAPI]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(tiny_store: Path) -> AsyncIterator[Client]:
    s = tiny_settings(
        tiny_store,
        models=["lpips-alex", tiny.SQUEEZE],
        max_body_bytes=2_000_000,
        max_pixels=1_000_000,
        max_candidates=4,
        max_wait_ms=50,
    )
    async with serve(s) as ca:
        yield ca


@pytest.fixture(scope="module")
def imgs() -> list[bytes]:
    return jpegs(5)


@pytest.fixture(scope="module")
def served(tiny_store: Path) -> ModelStore:
    """The store the service reads (the tiny one)."""
    return ModelStore(tiny_store)


@pytest.fixture(scope="module")
def plain(served: ModelStore) -> Iterator[Any]:
    """Reference distances from the plain metric at 64×64 (no service, no batching), same weights."""

    def distance(model: str, a: bytes, b: bytes) -> float:
        metric_ = served.load(model)
        with torch.inference_mode():
            return float(metric_(load_tensor(a, 64)[None], load_tensor(b, 64)[None])[0])

    yield distance


def error_of(r: httpx.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code and err["message"]
    assert set(err) <= {"code", "message", "field", "error_id"}
    if field is not None:
        assert err.get("field") == field, err
    return err


async def test_health_ready_and_docs(api: Client) -> None:
    client, _ = api
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    assert "swagger" in (await client.get("/docs")).text.lower()
    spec = (await client.get("/openapi.json")).json()
    body = spec["paths"]["/distance"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert body["application/json"]["example"]["candidates"]
    assert {"200", "400", "413", "415", "422", "429", "500", "503", "504"} <= set(
        spec["paths"]["/distance"]["post"]["responses"]
    )
    assert {"/models", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])


async def test_distance_multipart_one_to_n_in_candidate_order(
    api: Client, imgs: list[bytes], plain: Any, served: ModelStore
) -> None:
    client, _ = api
    ref, a, b, c, _ = imgs
    r = await client.post("/distance", files=multipart(ref, a, ref, b, c))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "lpips-alex" and body["resolution"] == [64, 64]
    assert body["threshold"] == served.model("lpips-alex").threshold
    got = [res["distance"] for res in body["results"]]
    want = [plain("lpips-alex", ref, x) for x in (a, ref, b, c)]
    assert got == pytest.approx(want, abs=1e-5)
    assert got[1] == pytest.approx(0.0, abs=1e-6)
    assert [res["near_duplicate"] for res in body["results"]] == [
        d <= body["threshold"] for d in got
    ]
    assert all("per_layer" not in res and "spatial_png" not in res for res in body["results"])
    assert set(body["timing_ms"]) == {"decode", "queue", "inference", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] > 0


async def test_distance_json_equals_multipart_and_options(
    api: Client, imgs: list[bytes], plain: Any
) -> None:
    client, _ = api
    ref, a, b, _, _ = imgs
    enc = [base64.b64encode(x).decode() for x in (ref, a, b)]
    doc = {
        "reference": "data:image/jpeg;base64," + enc[0],
        "candidates": enc[1:],
        "model": tiny.SQUEEZE,
        "threshold": 0.0,
        "per_layer": True,
        "spatial": True,
    }
    r = await client.post("/distance", json=doc)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == tiny.SQUEEZE and body["threshold"] == 0.0
    for res, x in zip(body["results"], (a, b), strict=True):
        assert res["distance"] == pytest.approx(plain(tiny.SQUEEZE, ref, x), abs=1e-5)
        assert res["near_duplicate"] is False
        assert len(res["per_layer"]) == 7 and sum(res["per_layer"]) == pytest.approx(
            res["distance"], rel=1e-5
        )
        heat = Image.open(io.BytesIO(base64.b64decode(res["spatial_png"])))
        assert heat.format == "PNG" and heat.size == (64, 64)
    form = {"model": tiny.SQUEEZE, "threshold": "0", "per_layer": "true"}
    m = await client.post("/distance", files=multipart(ref, a, b), data=form)
    assert [x["distance"] for x in m.json()["results"]] == pytest.approx(
        [x["distance"] for x in body["results"]], abs=1e-6
    )


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"model": "no-such-model"}, "model"),
        ({"model": tiny.MISSING}, "model"),  # in the store, not loaded here
        ({"threshold": "-0.1"}, "threshold"),
        ({"threshold": "nan"}, "threshold"),
        ({"threshold": "abc"}, "threshold"),
        ({"spatial": "maybe"}, "spatial"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_bad_fields_are_422_naming_the_field(
    api: Client, imgs: list[bytes], form: dict[str, str], field: str
) -> None:
    client, _ = api
    r = await client.post("/distance", files=multipart(imgs[0], imgs[1]), data=form)
    error_of(r, 422, "validation_error", field)


async def test_request_shape_errors(api: Client, imgs: list[bytes]) -> None:
    client, _ = api
    ref, a = imgs[:2]
    error_of(
        await client.post("/distance", files=[("candidate", ("a.jpg", a))]),
        422,
        "validation_error",
        "reference",
    )
    error_of(
        await client.post("/distance", files=[("reference", ("r.jpg", ref))]),
        422,
        "validation_error",
        "candidate",
    )
    error_of(
        await client.post("/distance", files=multipart(ref, *([a] * 5))),
        422,
        "validation_error",
        "candidate",
    )
    error_of(
        await client.post("/distance", json={"reference": "AA==", "candidates": []}),
        422,
        "validation_error",
        "candidates",
    )
    error_of(await client.post("/distance", json={"candidates": ["AA=="]}), 422, "validation_error")
    error_of(
        await client.post("/distance", content=b"null", headers=_json()), 422, "validation_error"
    )
    error_of(await client.post("/distance", content=b"{nope", headers=_json()), 400, "invalid_json")
    error_of(
        await client.post("/distance", content=b"hello", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    error_of(
        await client.post(
            "/distance", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}
        ),
        400,
        "invalid_multipart",
    )


def _json() -> dict[str, str]:
    return {"content-type": "application/json"}


async def test_image_errors_name_the_field(api: Client, imgs: list[bytes]) -> None:
    client, _ = api
    ref, a = imgs[:2]
    r = await client.post("/distance", files=multipart(ref, a, b"not an image at all"))
    error_of(r, 400, "invalid_image", "candidate[1]")
    r = await client.post("/distance", files=multipart(ref, a[: len(a) // 3]))
    error_of(r, 400, "invalid_image", "candidate[0]")
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    r = await client.post("/distance", files=multipart(ico.getvalue(), a))
    error_of(r, 415, "unsupported_media_type", "reference")
    r = await client.post("/distance", files=multipart(ref, png(1200, 1000)))
    assert "1000000" in error_of(r, 413, "image_too_large", "candidate[0]")["message"]
    doc = {"reference": base64.b64encode(ref).decode(), "candidates": ["@@not base64@@"]}
    error_of(await client.post("/distance", json=doc), 400, "invalid_base64", "candidates[0]")


async def test_body_limit_declared_and_streamed(api: Client) -> None:
    client, _ = api
    big = b"x" * 2_500_000
    r = await client.post("/distance", content=big, headers=_json())
    error_of(r, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield b"y" * 100_000

    r = await client.post("/distance", content=chunks(), headers=_json())
    assert "content-length" not in r.request.headers
    error_of(r, 413, "payload_too_large")


async def test_unknown_path_method_and_not_found_bodies(api: Client) -> None:
    client, _ = api
    error_of(await client.get("/nowhere"), 404, "not_found")
    error_of(await client.get("/distance"), 405, "method_not_allowed")


async def test_internal_error_has_a_logged_error_id_and_no_trace(
    api: Client,
    imgs: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, app = api

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected device failure")

    monkeypatch.setattr(runtime(app).engine, "compute", boom)
    with caplog.at_level(logging.ERROR):
        r = await client.post("/distance", files=multipart(imgs[0], imgs[1]))
    err = error_of(r, 500, "internal_error")
    assert err["error_id"] in caplog.text and "injected device failure" in caplog.text
    assert "Traceback" not in r.text and "injected" not in r.text
    monkeypatch.undo()
    assert (await client.get("/readyz")).status_code == 200  # one failed batch leaves it serving
    assert (await client.post("/distance", files=multipart(imgs[0], imgs[1]))).status_code == 200


async def test_models_lists_the_store(api: Client, served: ModelStore) -> None:
    client, _ = api
    listing = (await client.get("/models")).json()["models"]
    assert [m["name"] for m in listing] == served.names
    assert [m["name"] for m in listing if m["default"]] == ["lpips-alex"]
    by_name = {m["name"]: m for m in listing}
    assert by_name["lpips-alex"]["loaded"] and by_name[tiny.SQUEEZE]["loaded"]
    assert not by_name[tiny.MISSING]["loaded"]
    alex = by_name["lpips-alex"]
    assert alex["trunk"] == "alex" and alex["threshold"] == served.model("lpips-alex").threshold
    assert all(f["available"] and len(f["sha256"]) == 64 for f in alex["files"])
    assert any(not f["available"] for f in by_name[tiny.MISSING]["files"])


async def test_concurrent_requests_are_batched_and_equal_sequential(
    api: Client, imgs: list[bytes]
) -> None:
    client, _ = api
    before = (await client.get("/metrics")).text
    pairs = [(imgs[i % 5], imgs[(i + 1) % 5]) for i in range(12)]
    seq = [await client.post("/distance", files=multipart(a, b)) for a, b in pairs[:5]]
    mid = (await client.get("/metrics")).text
    conc = await asyncio.gather(
        *(client.post("/distance", files=multipart(a, b)) for a, b in pairs)
    )
    after = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in conc)
    got = [r.json()["results"][0]["distance"] for r in conc]
    assert got[:5] == pytest.approx([r.json()["results"][0]["distance"] for r in seq], abs=1e-5)
    n_batches = metric(after, "rlpips_batch_size_count") - metric(mid, "rlpips_batch_size_count")
    n_pairs = metric(after, "rlpips_batch_size_sum") - metric(mid, "rlpips_batch_size_sum")
    assert n_pairs == 12 and n_batches < 12  # some batch held more than one request
    assert metric(mid, "rlpips_batch_size_count") > metric(before, "rlpips_batch_size_count")


async def test_metrics_after_traffic(api: Client, imgs: list[bytes]) -> None:
    client, _ = api
    for _ in range(2):  # the same reference twice: the second lookup is a cache hit
        assert (
            await client.post("/distance", files=multipart(imgs[4], imgs[0]))
        ).status_code == 200
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "rlpips_requests_total", endpoint="/distance", status="200") >= 2
    assert metric(text, "rlpips_requests_total", endpoint="/distance", status="422") >= 1
    assert metric(text, "rlpips_request_duration_seconds_count", endpoint="/distance") >= 2
    assert metric(text, "rlpips_pairs_total", model="lpips-alex") >= 2
    assert metric(text, "rlpips_cache_requests_total", result="hit") >= 1
    assert metric(text, "rlpips_cache_requests_total", result="miss") >= 1
    assert metric(text, "rlpips_model_info", name=tiny.SQUEEZE, device="cpu") == 1
    assert metric(text, "rlpips_decode_duration_seconds_count") >= 4
    assert metric(text, "rlpips_queue_wait_seconds_count") >= 2
    assert metric(text, "rlpips_inference_duration_seconds_count", kind="distance") >= 1
    assert metric(text, "rlpips_queue_depth") == 0
    for name in ("rlpips_rejected_total", "rlpips_batch_size"):
        assert f"# TYPE {name.removesuffix('_total')}" in text
    assert "rlpips_device_memory_bytes" not in text  # CPU: no device memory gauge


async def test_an_app_without_lifespan_is_not_ready(tiny_store: Path, imgs: list[bytes]) -> None:
    from app.main import create_app

    app = create_app(tiny_settings(tiny_store))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/healthz")).status_code == 200
        error_of(await client.get("/readyz"), 503, "not_ready")
        error_of(
            await client.post("/distance", files=multipart(imgs[0], imgs[1])), 503, "not_ready"
        )
        listing = (await client.get("/models")).json()["models"]
        assert not any(m["loaded"] for m in listing)
        assert sum(m["default"] for m in listing) == 1
