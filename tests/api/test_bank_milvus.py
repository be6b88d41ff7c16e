"""Parity of the bank on Milvus (milvus-lite, the same engine embedded in a file) with the embedded
SQLite + FAISS default: the same items and searches through two apps give the same matches, distances,
candidate counts and item statuses."""

from __future__ import annotations

import base64
import random
from pathlib import Path

from tests.support.apiutil import jpegs, serve, settings


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def _run(s: object, items: dict[str, bytes], queries: list[bytes]) -> list[object]:
    out: list[object] = []
    async with serve(s) as (client, _):  # type: ignore[arg-type]
        r = await client.put("/banks/kb", json={"threshold": 0.35})
        out.append((r.status_code, {k: v for k, v in r.json().items() if k != "bytes"}))
        body = {"items": [{"id": k, "image": b64(v)} for k, v in items.items()]}
        out.append((await client.post("/banks/kb/items", json=body)).json()["items"])
        again = {"items": body["items"][:2]}
        out.append((await client.post("/banks/kb/items", json=again)).json()["items"])
        assert (await client.delete("/banks/kb/items/i3")).status_code == 204
        for q in queries:
            for cap in (4096, 3):
                r = await client.post(
                    "/banks/kb/search",
                    json={"image": b64(q), "limit": 100, "max_checked": cap, "mirror": cap == 3},
                )
                got = r.json()
                out.append(
                    (
                        got["candidates"],
                        got["checked"],
                        got["complete"],
                        [(m["id"], round(m["distance"], 4)) for m in got["matches"]],
                    )
                )
        info = (await client.get("/banks/kb")).json()
        out.append(info["items"])
        assert (await client.delete("/banks/kb")).status_code == 204
    return out


async def test_milvus_lite_matches_the_embedded_default(weights_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(5)
    pool = jpegs(16, start=700)
    items = {f"i{k}": pool[k] for k in range(12)}
    queries = [pool[2], pool[13], pool[rng.randrange(12)]]
    # grid 4: lpips-alex's bound is tight enough at 64² to prune some items (both paths run)
    embedded = await _run(
        settings(weights_dir, data_dir=tmp_path / "e", bank_grid=4), items, queries
    )
    milvus = await _run(
        settings(weights_dir, data_dir=tmp_path / "m", bank_grid=4, bank_engine="milvus"),
        items,
        queries,
    )
    assert milvus == embedded
    searches = embedded[3:-1]
    assert any(s[3] for s in searches)  # type: ignore[index]  # some searches matched
    assert any(s[0] < 11 for s in searches)  # type: ignore[index]  # and the bound pruned some
