"""Banks of the default model use its fitted projection (docs/BANK.md): the bank says so, searches
are still exactly brute force when complete, a bank built with another projection is refused rather
than searched with mixed embeddings, and ``bank_embedding=cells`` keeps cell means."""

from __future__ import annotations

import random
from pathlib import Path

from app.bank.projection import Projection
from app.config import Settings
from tests.api.test_banks_api import add_json, b64, brute_force, variant
from tests.support.apiutil import jpegs, serve, settings
from tests.support.tools import shipped_projection

MODEL = "r-lpips-alex-linf-synth"


def robust(weights_dir: Path, data_dir: Path, **kw: object) -> Settings:
    return settings(weights_dir, data_dir=data_dir, default_model=MODEL, models=[MODEL], **kw)


async def test_projected_bank_is_exact_and_refuses_another_projection(
    weights_dir: Path, tmp_path: Path
) -> None:
    shipped_projection()  # fitted by `make test`
    pool = jpegs(16, start=500)
    items = {f"img{i}": d for i, d in enumerate(pool[:12])}
    for i in range(3):
        items[f"img{i}-jpeg"] = variant(pool[i], "jpeg")
        items[f"img{i}-blur"] = variant(pool[i], "blur")
    rng = random.Random(5)
    async with serve(robust(weights_dir, tmp_path)) as (client, app):
        r = await client.put("/banks/p", json={"threshold": 0.3})
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["embedding"].startswith("projected:") and info["grid"] == 0
        assert info["dimension"] == 256
        assert (await add_json(client, "p", items)).status_code == 200
        matched = 0
        for q in (variant(pool[1], "bright"), pool[4], pool[rng.randrange(12, 16)]):
            truth = await brute_force(client, q, items)
            r = await client.post(
                "/banks/p/search", json={"image": b64(q), "limit": 100, "max_checked": 4096}
            )
            got = r.json()
            assert r.status_code == 200 and got["complete"], r.text
            expected = {i for i, d in truth.items() if d <= 0.3}
            matched += len(expected)
            assert {m["id"] for m in got["matches"]} == expected
            for m in got["matches"]:
                assert abs(m["distance"] - truth[m["id"]]) <= 1e-4
        assert matched >= 3
        # the store's projection changes (a refit): the bank's vectors no longer fit, so 409
        banks = app.state.banks
        old = banks.projection(MODEL)
        assert old is not None and info["embedding"] == old.key
        banks._projections[MODEL] = Projection(old.grids, old.basis, "0" * 64)
        r = await client.post("/banks/p/search", json={"image": b64(pool[0])})
        assert r.status_code == 409 and "re-create the bank" in r.json()["error"]["message"]
        banks._projections[MODEL] = old
        r = await client.post("/banks/p/search", json={"image": b64(pool[0])})
        assert r.json()["matches"][0]["id"] == "img0"


async def test_cells_setting_and_reopened_bank_keep_their_embedding(
    weights_dir: Path, tmp_path: Path
) -> None:
    img = jpegs(1, start=600)[0]
    s = robust(weights_dir, tmp_path, bank_embedding="cells", bank_grid=2)
    async with serve(s) as (client, _):
        info = (await client.put("/banks/c")).json()
        assert (info["embedding"], info["grid"], info["dimension"]) == ("cells", 2, 4608)
        assert (await add_json(client, "c", {"x": img})).status_code == 200
    # reopened by a service whose new banks are projected: the old bank stays a cells bank
    shipped_projection()
    async with serve(robust(weights_dir, tmp_path)) as (client, _):
        assert (await client.get("/banks/c")).json()["embedding"] == "cells"
        r = await client.post("/banks/c/search", json={"image": b64(img)})
        assert r.json()["matches"][0]["id"] == "x"
        assert (await client.put("/banks/d")).json()["embedding"].startswith("projected:")


async def test_without_the_projection_file_new_banks_use_cell_means(
    weights_dir: Path, tmp_path: Path
) -> None:
    """A store whose projection file is not there (not fitted: no `make projection`): the service
    still works, new banks of the default model get cell means."""
    img = jpegs(1, start=620)[0]
    s = robust(weights_dir, tmp_path / "data", cache_dir=tmp_path / "empty-cache")
    async with serve(s) as (client, _):
        info = (await client.put("/banks/k")).json()
        assert (info["embedding"], info["grid"], info["dimension"]) == ("cells", 1, 1152)
        assert (await add_json(client, "k", {"x": img})).status_code == 200
        r = await client.post("/banks/k/search", json={"image": b64(img)})
        assert r.json()["matches"][0]["id"] == "x"
