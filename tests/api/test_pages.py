"""The browser-facing parts through the ASGI app: ``/ui`` and ``/docs`` with every asset served by the
app (nothing from another origin), the pages open while the API needs a key (or closed by setting),
and an OpenAPI document with key schemes, described multipart fields and one example per error code.
What the page does in a real browser is in ``tests/e2e/test_browser.py``."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.api import pages
from app.api.bodies import ERROR_EXAMPLES, UNDOCUMENTED_CODES
from app.api.errors import STATUS
from tests.support.apiutil import jpegs, multipart, serve, tiny_settings

KEY = "page-test-key-0123456789"


class Links(HTMLParser):
    """Every ``src`` and ``href`` of a document."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def links(html: str) -> list[str]:
    parser = Links()
    parser.feed(html)
    return parser.urls


async def test_pages_and_every_asset_they_name_are_served_locally(tiny_store: Path) -> None:
    async with serve(tiny_settings(tiny_store)) as (client, _):
        root = await client.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/ui"
        for page in ("/ui", "/docs"):
            r = await client.get(page)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            for url in links(r.text):
                assert "//" not in url and not url.startswith("/"), f"{page}: {url} is not relative"
                asset = await client.get(f"/{url}")  # relative to the page, which sits at the root
                assert asset.status_code == 200, (page, url, asset.text[:200])
                assert len(asset.content) > 0
        csp = (await client.get("/ui")).headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
        missing = await client.get("/static/../config.py")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert (await client.get("/static/nope.js")).json()["error"]["code"] == "not_found"
        assert (await client.head("/ui")).status_code == 200


def test_the_pages_own_assets_name_no_other_origin() -> None:
    """Our HTML, script and style load nothing from elsewhere (Swagger UI's bundle is the package's)."""
    own = [p for p in pages.ASSETS.values() if p.parent.name == "static" and "app" in p.parts]
    own.append(Path(pages.__file__).parent / "static" / "ui.html")
    assert len(own) == 4
    for path in own:
        text = path.read_text()
        assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path.name
        assert 'fetch("/' not in text and 'api("/' not in text, f"{path.name}: absolute API URL"


async def test_pages_are_open_while_the_api_needs_a_key(tiny_store: Path) -> None:
    async with serve(tiny_settings(tiny_store, api_keys=[KEY])) as (client, _):
        for path in sorted(pages.PAGE_PATHS):
            r = await client.get(path, follow_redirects=False)
            assert r.status_code in (200, 307), path
        assert (await client.get("/openapi.json")).status_code == 401
        assert (await client.get("/models")).status_code == 401
        ok = await client.get("/openapi.json", headers={"X-API-Key": KEY})
        assert ok.status_code == 200
    async with serve(tiny_settings(tiny_store, api_keys=[KEY], open_pages=False)) as (client, _):
        for path in ("/ui", "/docs", "/static/ui.js"):
            assert (await client.get(path)).status_code == 401, path


async def test_openapi_names_key_schemes_and_requires_them_only_with_keys(tiny_store: Path) -> None:
    async with serve(tiny_settings(tiny_store)) as (client, _):
        doc = (await client.get("/openapi.json")).json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["Bearer"]["scheme"] == "bearer"
    assert all("security" not in op for ops in doc["paths"].values() for op in ops.values())
    async with serve(tiny_settings(tiny_store, api_keys=[KEY])) as (client, _):
        doc = (await client.get("/openapi.json", headers={"X-API-Key": KEY})).json()
    for path, ops in doc["paths"].items():
        for op in ops.values():
            needs = "security" in op
            assert needs == (path not in ("/healthz", "/readyz", "/metrics")), path


async def test_openapi_documents_every_error_code_and_every_multipart_field(
    tiny_store: Path,
) -> None:
    async with serve(tiny_settings(tiny_store)) as (client, _):
        doc = (await client.get("/openapi.json")).json()
    documented: set[str] = set()
    for path, method in (
        ("/distance", "post"),
        ("/robustness-check", "post"),
        ("/banks/{bank}", "put"),
        ("/banks/{bank}/items", "post"),
        ("/banks/{bank}/search", "post"),
    ):
        op = doc["paths"][path][method]
        for status, response in op["responses"].items():
            for code, example in (
                response.get("content", {}).get("application/json", {}).get("examples", {}).items()
            ):
                assert STATUS[code] == int(status), (code, status)
                assert example["value"]["error"]["code"] == code
                documented.add(code)
        content = op.get("requestBody", {}).get("content", {})
        form = content.get("multipart/form-data", {"schema": {"properties": {}}})["schema"]
        for name, field in form["properties"].items():
            assert field.get("description"), f"{path}: multipart field {name} has no description"
    assert documented == set(ERROR_EXAMPLES) == set(STATUS) - UNDOCUMENTED_CODES
    for code in UNDOCUMENTED_CODES:
        assert f"`{code}`" in doc["info"]["description"]


def recompressed(data: bytes, quality: int) -> bytes:
    out = BytesIO()
    Image.open(BytesIO(data)).convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def reaches_top(spatial_png: str) -> bool:
    """Whether a heat map has a pixel at (or next to) magma(1.0), the top of the colour scale."""
    pixels = np.asarray(Image.open(BytesIO(base64.b64decode(spatial_png)))).astype(int)
    return bool(np.abs(pixels - np.array([252, 253, 191])).sum(axis=-1).min() <= 6)


async def test_heat_maps_share_a_colour_scale_on_request(tiny_store: Path) -> None:
    """``spatial_max`` is the value at the top of the colour scale: each map's own peak by default,
    the request's largest with ``spatial_scale=shared`` (then only the map holding that peak reaches
    the top colour); the distances do not change."""
    ref, far = jpegs(2, start=40)
    files = multipart(ref, recompressed(ref, 30), far)
    answers = {}
    async with serve(tiny_settings(tiny_store)) as (client, _):
        for scale in ("pair", "shared"):
            data = {"spatial": "true", "spatial_scale": scale}
            r = await client.post("/distance", files=files, data=data)
            assert r.status_code == 200, r.text
            answers[scale] = r.json()["results"]
    own = [res["spatial_max"] for res in answers["pair"]]
    assert own[0] != own[1] and all(reaches_top(res["spatial_png"]) for res in answers["pair"])
    shared = answers["shared"]
    assert [res["spatial_max"] for res in shared] == [max(own)] * 2
    assert [reaches_top(res["spatial_png"]) for res in shared] == [p == max(own) for p in own]
    same = pytest.approx([res["distance"] for res in answers["pair"]], rel=1e-5)
    assert [res["distance"] for res in shared] == same
