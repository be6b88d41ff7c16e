"""The known-items bank through the ASGI app with the real lpips-alex at 64²: exactness against brute
force (every item under the threshold found, distances equal to /distance), both encodings,
idempotent adds, the mirror option, and the error codes."""

from __future__ import annotations

import asyncio
import base64
import io
import random
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageFilter
from rlpips_client import AsyncClient, ClientError

from tests.support.apiutil import jpegs, serve, settings, tiny_settings


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def variant(data: bytes, kind: str) -> bytes:
    """A near copy of ``data``: JPEG q=30, blur, brightened, or left-right mirrored (as PNG)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    if kind == "jpeg":
        img.save(out, format="JPEG", quality=30)
        return out.getvalue()
    if kind == "blur":
        img = img.filter(ImageFilter.GaussianBlur(1.5))
    elif kind == "bright":
        img = img.point(lambda v: min(255, int(v * 1.15)))
    elif kind == "flip":
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.save(out, format="PNG")
    return out.getvalue()


async def add_json(client: httpx.AsyncClient, bank: str, items: dict[str, bytes]) -> httpx.Response:
    body = {"items": [{"id": k, "image": b64(v)} for k, v in items.items()]}
    return await client.post(f"/banks/{bank}/items", json=body)


async def brute_force(
    client: httpx.AsyncClient, query: bytes, items: dict[str, bytes]
) -> dict[str, float]:
    """/distance of the query (reference) against every item (candidates)."""
    ids = list(items)
    r = await client.post(
        "/distance", json={"reference": b64(query), "candidates": [b64(items[i]) for i in ids]}
    )
    assert r.status_code == 200, r.text
    return {i: res["distance"] for i, res in zip(ids, r.json()["results"], strict=True)}


async def test_search_equals_brute_force_on_random_banks(weights_dir: Path, tmp_path: Path) -> None:
    """Random banks of ImageNet images and near copies: with every survivor checked, the matches are
    exactly the items whose /distance is under the threshold (none missing, none extra), in increasing
    distance, each distance equal to /distance's (≤ 1e-4); the lower bound never drops a match."""
    rng = random.Random(17)
    pool = jpegs(24, start=100)
    found = missed = 0
    async with serve(settings(weights_dir, data_dir=tmp_path)) as (client, _):
        for trial, threshold in enumerate((0.2, 0.45, 0.7)):
            picks = rng.sample(range(len(pool)), 10)
            items = {f"img{i}": pool[i] for i in picks}
            for i in picks[:3]:
                items[f"img{i}-{trial}-jpeg"] = variant(pool[i], "jpeg")
                items[f"img{i}-{trial}-blur"] = variant(pool[i], "blur")
            bank = f"random-{trial}"
            r = await client.put(f"/banks/{bank}", json={"threshold": threshold})
            assert r.status_code == 201, r.text
            assert (await add_json(client, bank, items)).status_code == 200
            for q in (variant(pool[picks[0]], "bright"), pool[picks[5]], pool[rng.randrange(24)]):
                truth = await brute_force(client, q, items)
                r = await client.post(
                    f"/banks/{bank}/search",
                    json={"image": b64(q), "limit": 1000, "max_checked": 4096},
                )
                assert r.status_code == 200, r.text
                got = r.json()
                assert got["complete"] and got["checked"] == got["candidates"] <= len(items)
                expected = {i for i, d in truth.items() if d <= threshold}
                found, missed = found + len(expected), missed + len(items) - len(expected)
                assert {m["id"] for m in got["matches"]} == expected
                dists = [m["distance"] for m in got["matches"]]
                assert dists == sorted(dists)
                for m in got["matches"]:
                    assert abs(m["distance"] - truth[m["id"]]) <= 1e-4
                    assert m["near_duplicate"]
                # capped: at most 3 exact checks, flagged incomplete when more survived;
                # whatever it returns is still exact
                r = await client.post(
                    f"/banks/{bank}/search", json={"image": b64(q), "limit": 1000, "max_checked": 3}
                )
                capped = r.json()
                assert capped["checked"] == min(3, capped["candidates"])
                assert capped["complete"] == (capped["candidates"] <= 3)
                assert {m["id"] for m in capped["matches"]} <= expected
    assert found >= 10 and missed >= 10  # the banks held both matches and non-matches


async def test_items_idempotent_multipart_and_mirror(weights_dir: Path, tmp_path: Path) -> None:
    imgs = jpegs(6, start=300)
    async with serve(settings(weights_dir, data_dir=tmp_path)) as (client, _):
        r = await client.put("/banks/kb")
        assert r.status_code == 201 and r.json()["items"] == 0
        assert (await client.put("/banks/kb")).status_code == 200  # same settings: fine
        assert (await client.put("/banks/kb", json={"threshold": 0.01})).status_code == 409
        files = [("image", (f"{i}.jpg", d)) for i, d in enumerate(imgs[:4])]
        data = {"id": ["a0", "a1", "a2", "a3"]}
        r = await client.post("/banks/kb/items", files=files, data=data)
        assert r.status_code == 200, r.text
        assert [s["status"] for s in r.json()["items"]] == ["added"] * 4
        r = await add_json(client, "kb", {"a0": imgs[0], "a1": imgs[5]})  # again; a1 changes
        assert [s["status"] for s in r.json()["items"]] == ["unchanged", "replaced"]
        info = (await client.get("/banks/kb")).json()
        assert info["items"] == 4 and info["bytes"] > 0 and info["model"] == "lpips-alex"
        # the mirror option finds a flipped copy (at a distance equal to /distance with hflip)
        flipped = variant(imgs[2], "flip")
        r = await client.post(
            "/banks/kb/search", files={"image": ("q.png", flipped)}, data={"mirror": "true"}
        )
        got = r.json()
        assert r.status_code == 200, r.text
        assert got["matches"][0]["id"] == "a2" and got["matches"][0]["mirrored"] is True
        ref = await client.post(
            "/distance",
            json={"reference": b64(imgs[2]), "candidates": [b64(flipped)], "invariance": ["hflip"]},
        )
        assert abs(ref.json()["results"][0]["distance"] - got["matches"][0]["distance"]) <= 1e-4
        # removal
        assert (await client.delete("/banks/kb/items/a2")).status_code == 204
        assert (await client.delete("/banks/kb/items/a2")).status_code == 404
        r = await client.post("/banks/kb/search", json={"image": b64(imgs[2])})
        assert "a2" not in {m["id"] for m in r.json()["matches"]}
        assert (await client.delete("/banks/kb")).status_code == 204
        assert (await client.get("/banks/kb")).json()["error"]["code"] == "not_found"


async def test_bank_errors(tiny_store: Path, tmp_path: Path) -> None:
    img = jpegs(1)[0]
    s = tiny_settings(tiny_store, data_dir=tmp_path, bank_max_items=2)
    async with serve(s) as (client, _):
        r = await client.get("/banks/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await client.post("/banks/nope/search", json={"image": b64(img)})
        assert r.status_code == 404
        assert (await client.put("/banks/bad$name")).status_code == 422
        assert (await client.put("/banks/" + "x" * 129)).status_code == 422
        assert (await client.put("/banks/b", json={"model": "lpips-vgg"})).status_code == 422
        assert (await client.put("/banks/b", content=b"{")).json()["error"][
            "code"
        ] == "invalid_json"
        assert (await client.put("/banks/b")).status_code == 201
        r = await add_json(client, "b", {"x": img, "y": img, "z": img})
        assert r.status_code == 422 and r.json()["error"]["field"] == "items"
        r = await client.post("/banks/b/items", json={"items": [{"id": "a b", "image": b64(img)}]})
        assert r.status_code == 422
        files = [("image", ("a.jpg", img)), ("image", ("b.jpg", img))]
        r = await client.post("/banks/b/items", files=files, data={"id": ["only-one"]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "id"
        r = await client.post("/banks/b/items", json={"items": [{"id": "x", "image": "!!"}]})
        assert r.json()["error"]["code"] == "invalid_base64"
        r = await client.post("/banks/b/items", json={"items": [{"id": "x", "image": b64(b"no")}]})
        assert r.json()["error"]["code"] == "invalid_image"
        r = await client.post("/banks/b/search", json={"image": b64(img), "limit": 0})
        assert r.status_code == 422
        assert (await client.delete("/banks/b/items/none")).status_code == 404
        metrics = (await client.get("/metrics")).text
        assert "rlpips_bank_items" in metrics and "rlpips_bank_search_duration_seconds" in metrics


async def test_async_client_bank_operations(tiny_store: Path, tmp_path: Path) -> None:
    """The client library's bank calls (multipart adds, search options, deletes) against the app."""
    imgs = jpegs(3, start=40)
    async with serve(tiny_settings(tiny_store, data_dir=tmp_path)) as (_, app):
        transport = httpx.ASGITransport(app=app)
        async with AsyncClient("http://test", transport=transport, retries=0) as c:
            info = await c.bank_create("kb", threshold=0.3)
            assert (info.name, info.threshold, info.items) == ("kb", 0.3, 0)
            assert await c.bank_add("kb", {"x": imgs[0], "y": imgs[1]}) == {
                "x": "added",
                "y": "added",
            }
            res = await c.bank_search("kb", imgs[1], limit=1, max_checked=8, mirror=True)
            assert res.complete and res.matches[0].id == "y" and res.matches[0].distance < 1e-6
            assert res.matches[0].mirrored is False
            await c.bank_remove("kb", "y")
            with pytest.raises(ClientError) as err:
                await c.bank_remove("kb", "y")
            assert err.value.code == "not_found"
            assert (await c.bank_info("kb")).items == 1
            await c.bank_delete("kb")
            with pytest.raises(ClientError):
                await c.bank_info("kb")


async def test_two_replicas_on_one_data_dir_see_the_same_bank(
    tiny_store: Path, tmp_path: Path
) -> None:
    """Two apps on one data directory (replicas on one volume): an item added through one is found
    through the other within the refresh interval (the staleness bound), and a removal likewise."""
    img = jpegs(1, start=60)[0]
    s = tiny_settings(tiny_store, data_dir=tmp_path, bank_refresh_s=0.1)
    async with serve(s) as (one, _), serve(s) as (two, _):
        assert (await one.put("/banks/shared")).status_code == 201
        assert (await add_json(one, "shared", {"a": img})).status_code == 200
        await asyncio.sleep(0.5)
        r = await two.post("/banks/shared/search", json={"image": b64(img)})
        assert r.status_code == 200, r.text
        assert [m["id"] for m in r.json()["matches"]] == ["a"]
        assert (await two.delete("/banks/shared/items/a")).status_code == 204
        await asyncio.sleep(0.5)
        r = await one.post("/banks/shared/search", json={"image": b64(img)})
        assert r.json()["matches"] == []


async def test_bank_endpoints_need_an_api_key_when_keys_are_set(
    tiny_store: Path, tmp_path: Path
) -> None:
    key = "bank-test-key-0123456789"
    s = tiny_settings(tiny_store, data_dir=tmp_path, api_keys=key)
    async with serve(s) as (client, _):
        for method, path in (
            ("PUT", "/banks/k"),
            ("GET", "/banks/k"),
            ("POST", "/banks/k/items"),
            ("POST", "/banks/k/search"),
            ("DELETE", "/banks/k/items/a"),
            ("DELETE", "/banks/k"),
        ):
            r = await client.request(method, path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
        r = await client.put("/banks/k", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 201


async def test_an_unusable_data_dir_leaves_distance_serving(
    tiny_store: Path, tmp_path: Path
) -> None:
    """A data directory that cannot be created (a file is in the way): /distance still works, the bank
    endpoints answer 503 not_ready."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    async with serve(tiny_settings(tiny_store, data_dir=blocker / "data")) as (client, _):
        img = b64(jpegs(1)[0])
        r = await client.post("/distance", json={"reference": img, "candidates": [img]})
        assert r.status_code == 200
        r = await client.put("/banks/k")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
