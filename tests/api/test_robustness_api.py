"""``POST /robustness-check`` through the ASGI app: defaults (the shipped robust model, real weights), both
encodings, caps, fairness, overload (on the tiny random-weight store)."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.imaging import load_tensor
from tests.support import KODAK
from tests.support import tinystore as tiny
from tests.support.apiutil import jpegs, runtime, serve, settings, tiny_settings


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_defaults_attack_the_reference_against_itself(weights_dir: Path) -> None:
    """With the store's default (the shipped robust model): one result per default model, and the
    robust model moves far less than LPIPS under the same attack."""
    kodim = (KODAK / "kodim23.png").read_bytes()
    async with serve(settings(weights_dir, default_model=None)) as (client, app):
        models = (await client.get("/models")).json()["models"]
        assert [m["name"] for m in models if m["default"]] == ["r-lpips-alex-linf-synth"]
        r = await client.post("/robustness-check", json={"reference": b64(kodim), "seed": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert runtime(app).default_model == "r-lpips-alex-linf-synth"
        results = {res["model"]: res for res in body["results"]}
        assert list(results) == ["lpips-alex", "r-lpips-alex-linf-synth"]
        attack = body["attack"]
        assert attack["epsilon"] == pytest.approx(4 / 255) and attack["steps"] == 20
        assert attack["goal"] == "evade" and attack["seed"] == 3
        for res in results.values():
            assert res["clean_distance"] == 0.0
            assert res["adversarial_distance"] > 0
            assert res["perturbation"]["linf"] <= 4 / 255 + 1e-9
            assert res["change"] == pytest.approx(res["adversarial_distance"])
        assert results["lpips-alex"]["adversarial_distance"] > 0.05
        robust = results["r-lpips-alex-linf-synth"]["adversarial_distance"]
        assert robust < results["lpips-alex"]["adversarial_distance"] / 3
        assert body["resolution"] == [64, 64] and body["timing_ms"]["inference"] > 0


async def test_multipart_impersonate_returns_the_measured_png(tiny_store: Path) -> None:
    ref, cand = jpegs(2)
    s = tiny_settings(tiny_store, models=["lpips-alex", tiny.SQUEEZE])
    async with serve(s) as (client, _):
        files = [("reference", ("r.jpg", ref)), ("candidate", ("c.jpg", cand))]
        data = {
            "models": f"lpips-alex,{tiny.SQUEEZE}",
            "goal": "impersonate",
            "steps": "10",
            "return_adversarial": "true",
            "seed": "1",
            "epsilon": "0.03",
        }
        r = await client.post("/robustness-check", files=files, data=data)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
    assert [x["model"] for x in results] == ["lpips-alex", tiny.SQUEEZE]
    clean_cand = (load_tensor(cand, 64) + 1) / 2
    for res in results:
        assert res["adversarial_distance"] < res["clean_distance"]
        png = base64.b64decode(res["adversarial_png"])
        adv = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255
        delta = adv.transpose(2, 0, 1) - clean_cand.numpy()
        assert np.abs(delta).max() <= 0.03 + 1e-6
        assert np.abs(np.abs(delta).max() - res["perturbation"]["linf"]) < 1e-6
    # the attacked image as the models saw it (8-bit): the candidate, rounded to the nearest level
    shown = Image.open(io.BytesIO(base64.b64decode(r.json()["attacked_png"]))).convert("RGB")
    levels = np.asarray(shown, dtype=np.float64).transpose(2, 0, 1)
    assert levels.shape == (3, 64, 64)
    assert np.abs(levels - clean_cand.numpy() * 255).max() <= 0.5 + 1e-4


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"steps": 101}, "steps"),
        ({"epsilon": 0.2}, "epsilon"),
        ({"attack": "l2", "epsilon": 1.0, "steps": 0}, "steps"),
        ({"attack": "l1"}, "attack"),
        ({"goal": "destroy"}, "goal"),
        ({"models": [tiny.MISSING]}, "models"),
        ({"models": ["no-such-model"]}, "models"),
        ({"step_size": -0.1}, "step_size"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**53}, "seed"),  # seeds stay exact in every JSON client (the schema says so too)
        ({"extra": 1}, "extra"),
    ],
)
async def test_bad_parameters_are_422_naming_the_field(
    tiny_store: Path, payload: dict[str, object], field: str
) -> None:
    async with serve(tiny_settings(tiny_store, max_attack_steps=100)) as (client, _):
        r = await client.post("/robustness-check", json={"reference": b64(jpegs(1)[0]), **payload})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "validation_error" and err["field"] == field, err
        assert (await client.get("/readyz")).status_code == 200


async def test_distance_completes_while_a_long_attack_runs(tiny_store: Path) -> None:
    ref, cand = jpegs(2)
    s = tiny_settings(tiny_store, resolution=128, attack_deadline_s=120, max_attack_steps=400)
    async with serve(s) as (client, _):
        attack = asyncio.create_task(
            client.post("/robustness-check", json={"reference": b64(ref), "steps": 400})
        )
        await asyncio.sleep(0.5)  # the attack is on the worker now
        files = [("reference", ("r.jpg", ref)), ("candidate", ("c.jpg", cand))]
        d = await client.post("/distance", files=files)
        assert d.status_code == 200, d.text
        assert not attack.done(), "the distance request had to wait for the whole attack"
        r = await attack
        assert r.status_code == 200, r.text


async def test_attack_jobs_over_the_cap_get_429(tiny_store: Path) -> None:
    ref = jpegs(1)[0]
    s = tiny_settings(
        tiny_store, resolution=128, max_attack_jobs=1, max_attack_steps=300, attack_deadline_s=120
    )
    async with serve(s) as (client, _):
        first = asyncio.create_task(
            client.post("/robustness-check", json={"reference": b64(ref), "steps": 300})
        )
        await asyncio.sleep(0.3)
        second = await client.post("/robustness-check", json={"reference": b64(ref), "steps": 5})
        assert second.status_code == 429, second.text
        assert (
            second.json()["error"]["code"] == "overloaded"
            and int(second.headers["Retry-After"]) >= 1
        )
        assert (await first).status_code == 200


async def test_deadline_applies_to_attacks(tiny_store: Path) -> None:
    s = tiny_settings(tiny_store, resolution=128, attack_deadline_s=0.5, max_attack_steps=500)
    async with serve(s) as (client, _):
        r = await client.post(
            "/robustness-check", json={"reference": b64(jpegs(1)[0]), "steps": 500}
        )
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert (await client.get("/readyz")).status_code == 200
