"""``RLPIPS_DECODE_DEVICE=device`` on the CPU (torchvision's decoder standing in for nvJPEG): /distance
decodes its JPEGs with the micro-batch, agrees with the Pillow path, takes other formats as before, and a
JPEG that only fails at that decode answers 400 for its own request alone."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image

from tests.support.apiutil import hold_device, jpegs, metric, multipart, runtime, serve, settings


def _baseline_jpeg(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()


def _broken(data: bytes) -> bytes:
    """A sound header whose scan names undefined Huffman tables: passes every check before decoding."""
    sos = data.index(b"\xff\xda")
    return data[: sos + 6] + b"\x33" + data[sos + 7 :]


def _png(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="PNG")
    return out.getvalue()


async def _distances(weights_dir: Path, device_decode: bool, images: list[bytes]) -> list[float]:
    s = settings(weights_dir, decode_device="device" if device_decode else "cpu")
    async with serve(s) as (client, _):
        r = await client.post("/distance", files=multipart(*images))
        assert r.status_code == 200, r.text
        if device_decode:  # decoded on the device thread, still counted per image
            text = (await client.get("/metrics")).text
            assert metric(text, "rlpips_decode_duration_seconds_count") == len(images)
        return [x["distance"] for x in r.json()["results"]]


async def test_device_decode_agrees_with_pillow(weights_dir: Path) -> None:
    ref, *cands = jpegs(5, start=300)
    images = [ref, *cands, _png(cands[0])]  # the PNG stays on the Pillow path
    on = await _distances(weights_dir, True, images)
    off = await _distances(weights_dir, False, images)
    assert on == pytest.approx(off, abs=3e-3)  # measured: 2.0e-3 at worst over 49 pairs at 256²
    assert on != off  # another decoder did run (libjpeg-turbo's IDCT and resize differ slightly)


async def test_an_image_failing_at_device_decode_fails_only_its_request(weights_dir: Path) -> None:
    a, b, c = (_baseline_jpeg(d) for d in jpegs(3, start=310))
    s = settings(weights_dir, decode_device="device", max_wait_ms=50)
    async with serve(s) as (client, app):
        rt = runtime(app)
        gate = hold_device(rt)
        try:
            bad = asyncio.ensure_future(client.post("/distance", files=multipart(a, b, _broken(c))))
            good = asyncio.ensure_future(client.post("/distance", files=multipart(a, c)))
            while rt.batcher.depth < 3:
                await asyncio.sleep(0.01)
        finally:
            gate.set()
        bad_r, good_r = await bad, await good
        assert good_r.status_code == 200 and len(good_r.json()["results"]) == 1
        assert bad_r.status_code == 400
        err = bad_r.json()["error"]
        assert err["code"] == "invalid_image" and "candidate" in err["field"], err
        assert (await client.get("/readyz")).status_code == 200
