"""``invariance: ["hflip"]`` on both endpoints and in both encodings, with the real LPIPS-alex: a
mirrored upload is close only with the option; the response says which variant won; a
robustness check measures the invariant distance; unknown invariances are refused (422)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from tests.support.apiutil import jpegs, multipart, serve, settings


def mirrored(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, format="PNG")
    return out.getvalue()


async def test_mirrored_upload_is_close_only_with_hflip(weights_dir: Path) -> None:
    ref, other = jpegs(2, start=70)
    flip = mirrored(ref)
    b64 = [base64.b64encode(x).decode() for x in (ref, flip, other)]
    async with serve(settings(weights_dir)) as (client, _):
        plain = await client.post("/distance", files=multipart(ref, flip, other))
        form = await client.post(
            "/distance", files=multipart(ref, flip, other), data={"invariance": "hflip"}
        )
        body = {"reference": b64[0], "candidates": b64[1:], "invariance": ["hflip"]}
        js = await client.post("/distance", json=body)
        bad = await client.post("/distance", json=body | {"invariance": ["vflip"]})
    assert plain.status_code == form.status_code == js.status_code == 200, (form.text, js.text)
    p, f, j = plain.json(), form.json(), js.json()
    assert "invariance" not in p and all("mirrored" not in r for r in p["results"])
    assert p["results"][0]["distance"] > 0.1  # without the option a mirror is far away
    for answer in (f, j):
        assert answer["invariance"] == ["hflip"]
        first, second = answer["results"]
        assert first["near_duplicate"] and first["mirrored"] is True
        assert first["distance"] < 0.02  # PNG of the mirror: lossless, only the JPEG decode differs
        assert second["distance"] <= p["results"][1]["distance"] + 1e-6
    assert [r["distance"] for r in f["results"]] == pytest.approx(
        [r["distance"] for r in j["results"]], rel=1e-5
    )
    assert bad.status_code == 422 and bad.json()["error"]["field"].startswith("invariance")


async def test_robustness_check_measures_the_invariant_distance(weights_dir: Path) -> None:
    ref = jpegs(1, start=71)[0]
    files = [("reference", ("r.jpg", ref)), ("candidate", ("c.png", mirrored(ref)))]
    data = {"models": "lpips-alex", "steps": "3", "seed": "0", "invariance": "hflip"}
    async with serve(settings(weights_dir)) as (client, _):
        r = await client.post("/robustness-check", files=files, data=data)
        plain = await client.post("/robustness-check", files=files, data=data | {"invariance": ""})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["invariance"] == ["hflip"]
    assert out["results"][0]["clean_distance"] < 0.02 and out["results"][0]["clean_match"]
    assert plain.status_code == 422  # an empty name is refused, not ignored
