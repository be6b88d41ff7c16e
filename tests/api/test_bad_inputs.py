"""The bad-input catalogue: hostile, broken and unusual requests to ``/distance`` and
``/robustness-check`` in both encodings.

Every refused request gets its documented 4xx with the JSON error body naming the problem; valid but
unusual images are accepted (200) and decoded by the documented convention; nothing ever answers 5xx or
shows a trace, and the service stays ready after each case.

On the tiny random-weight store: "decoded to the same picture" is a distance near 0 under any weights,
and "different pictures" a distance clearly above 0 (checked to hold for the tiny models).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from tests.support import badinputs as bad
from tests.support.apiutil import metric, serve, tiny_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_BODY = 300_000
MAX_PIXELS = 1_000_000
MAX_CANDIDATES = 3
GOOD = bad.jpeg()
OTHER = bad.png_of(bad.gradient(40, 40).rotate(90))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class Case:
    """One request: ``endpoint``, httpx ``post`` keyword arguments, and the expected answer."""

    name: str
    endpoint: str
    request: dict[str, Any]
    status: int
    code: str | None = None  # error code (None for 200)
    field: str | None = None  # the field the error must name
    says: str | None = None  # a word the message must contain
    check: Callable[[dict[str, Any]], None] | None = None


def mp(
    reference: bytes | None = GOOD,
    *candidates: bytes,
    data: dict[str, str] | None = None,
    extra: list[tuple[str, tuple[str, bytes]]] | None = None,
) -> dict[str, Any]:
    """Multipart ``files``/``data`` for a request (``reference`` None: no reference file)."""
    files = [] if reference is None else [("reference", ("ref.jpg", reference))]
    files += [("candidate", (f"c{i}.jpg", c)) for i, c in enumerate(candidates)]
    files += extra or []
    return {"files": files, "data": data or {}}


def js(doc: object) -> dict[str, Any]:
    return {"json": doc}


def raw(body: bytes, content_type: str | None = "application/json") -> dict[str, Any]:
    headers = {} if content_type is None else {"content-type": content_type}
    return {"content": body, "headers": headers}


def distance_close_to_zero(body: dict[str, Any]) -> None:
    """The unusual image decoded to the same picture as its plain twin (distance ~0)."""
    assert body["results"][0]["distance"] < 0.02, body


def distance_positive(body: dict[str, Any]) -> None:
    assert all(r["distance"] > 0.01 for r in body["results"]), body


def attack_ran(body: dict[str, Any]) -> None:
    assert body["attack"]["steps"] == 1 and body["results"][0]["perturbation"]["linf"] > 0, body


ANIM, ANIM_FIRST = bad.animated_gif()
CMYK, CMYK_RGB = bad.cmyk_jpeg()
PNG16, PNG16_8 = bad.png16()
TPAL, WHITE = bad.transparent_palette()
EXIF, UPRIGHT = bad.exif_rotated()

D, R = "/distance", "/robustness-check"
NO_NAME = b"--x\r\nContent-Type: text/plain\r\n\r\nabc\r\n--x--\r\n"
BAD_HEADER = b"--x\r\nthis is not a header\r\n\r\nabc\r\n--x--\r\n"
NOT_IMAGES = {"zero-byte": b"", "text": bad.TEXT, "html": bad.HTML, "svg": bad.SVG}
BROKEN = {
    "truncated-jpeg": bad.truncated(GOOD, 0.8),
    "truncated-png": bad.truncated(bad.png_of(), 0.7),
    "corrupt-jpeg-huffman": bad.corrupted_jpeg_header(),
    "corrupt-png-crc": bad.corrupted_png_crc(),
}
BOMBS = {
    "png-bomb-50000x50000": bad.png_bomb(),
    "jpeg-bomb-60000x60000": bad.jpeg_bomb(),
    "gif-bomb-65535x65535": bad.gif_bomb(),
    "png-bomb-10000x10000": bad.png_bomb(10_000, 10_000),  # Pillow warns, does not raise
    "png-over-limit-2000x2000": bad.png_bomb(2000, 2000),
}

CASES: list[Case] = [
    *(Case(f"{k}-candidate-multipart", D, mp(GOOD, GOOD, v), 400, "invalid_image", "candidate[1]")
      for k, v in (NOT_IMAGES | BROKEN).items()),
    *(Case(f"{k}-reference-json", D, js({"reference": b64(v), "candidates": [b64(GOOD)]}), 400,
           "invalid_image", "reference") for k, v in (NOT_IMAGES | BROKEN).items() if v),
    # an empty base64 string is outside the schema (minLength 1), so a validation error
    Case("zero-byte-reference-json", D, js({"reference": "", "candidates": [b64(GOOD)]}), 422,
         "validation_error", "reference"),
    *(Case(f"{k}-robustness-multipart", R, mp(v, data={"steps": "1"}), 400, "invalid_image",
           "reference") for k, v in NOT_IMAGES.items()),
    *(Case(f"{k}-robustness-json", R, js({"reference": b64(GOOD), "candidate": b64(v)}), 400,
           "invalid_image", "candidate") for k, v in BROKEN.items()),
    *(Case(f"{k}-distance", D, mp(GOOD, v), 413, "image_too_large", "candidate[0]", str(MAX_PIXELS))
      for k, v in BOMBS.items()),
    *(Case(f"{k}-robustness", R, js({"reference": b64(v)}), 413, "image_too_large", "reference",
           str(MAX_PIXELS)) for k, v in BOMBS.items()),
    Case("ico-not-allowed", D, mp(bad.encode(bad.gradient(16, 16), "ICO"), GOOD), 415,
         "unsupported_media_type", "reference", "ICO"),
    # valid but unusual images: accepted, decoded by the documented convention
    Case("animated-gif-first-frame", D, mp(ANIM_FIRST, ANIM), 200, check=distance_close_to_zero),
    Case("cmyk-jpeg", D, mp(CMYK_RGB, CMYK), 200, check=distance_close_to_zero),
    Case("png-16-bit", D, mp(PNG16_8, PNG16), 200, check=distance_close_to_zero),
    Case("palette-transparency-on-white", D, js({"reference": b64(WHITE),
         "candidates": [b64(TPAL)]}), 200, check=distance_close_to_zero),
    Case("exif-rotated", D, mp(UPRIGHT, EXIF), 200, check=distance_close_to_zero),
    Case("trailing-garbage-png", D, mp(bad.png_of(), bad.with_trailing_garbage(bad.png_of())), 200,
         check=distance_close_to_zero),
    Case("trailing-garbage-jpeg", D, mp(GOOD, bad.with_trailing_garbage(GOOD)), 200,
         check=distance_close_to_zero),
    Case("one-pixel", D, mp(GOOD, bad.png_of(bad.gradient(1, 1))), 200, check=distance_positive),
    Case("extreme-aspect-4000x1-and-1x4000", D, mp(bad.png_of(bad.gradient(4000, 1)),
         bad.png_of(bad.gradient(1, 4000))), 200, check=distance_positive),
    Case("robustness-cmyk-one-step", R, mp(CMYK, data={"steps": "1"}), 200, check=attack_ran),
    Case("robustness-exif-one-step", R, js({"reference": b64(EXIF), "steps": 1}), 200,
         check=attack_ran),
    # request shape: fields and files
    Case("wrong-field-name-multipart", D, mp(GOOD, extra=[("image", ("a.jpg", GOOD))]), 422,
         "validation_error", "image"),
    Case("missing-reference", D, mp(None, GOOD), 422, "validation_error", "reference"),
    Case("missing-candidate", D, mp(GOOD), 422, "validation_error", "candidate"),
    Case("two-references", D, mp(GOOD, GOOD, extra=[("reference", ("r2.jpg", GOOD))]), 422,
         "validation_error", "reference"),
    Case("reference-as-text-field", D, {"files": [("candidate", ("c.jpg", GOOD))],
         "data": {"reference": "abc"}}, 422, "validation_error", "reference"),
    Case("too-many-candidates-multipart", D, mp(GOOD, *[GOOD] * (MAX_CANDIDATES + 1)), 422,
         "validation_error", "candidate", str(MAX_CANDIDATES)),
    Case("too-many-candidates-json", D, js({"reference": b64(GOOD),
         "candidates": [b64(GOOD)] * (MAX_CANDIDATES + 1)}), 422, "validation_error", "candidates"),
    Case("robustness-two-candidates", R, mp(GOOD, GOOD, GOOD), 422, "validation_error",
         "candidate"),
    Case("robustness-missing-reference", R, mp(None, GOOD), 422, "validation_error", "reference"),
    Case("robustness-wrong-field-json", R, js({"image": b64(GOOD)}), 422, "validation_error"),
    Case("json-unknown-field", D, js({"reference": b64(GOOD), "candidates": [b64(GOOD)],
         "colour": 1}), 422, "validation_error", "colour"),
    Case("json-reference-not-a-string", D, js({"reference": 7, "candidates": [b64(GOOD)]}), 422,
         "validation_error", "reference"),
    Case("json-candidates-not-a-list", D, js({"reference": b64(GOOD), "candidates": b64(GOOD)}),
         422, "validation_error", "candidates"),
    # encodings
    Case("bad-base64", D, js({"reference": b64(GOOD), "candidates": ["@@not base64@@"]}), 400,
         "invalid_base64", "candidates[0]"),
    Case("bad-base64-padding", R, js({"reference": b64(GOOD)[:-3]}), 400, "invalid_base64",
         "reference"),
    Case("data-url-without-base64", D, js({"reference": "data:image/png," + b64(GOOD),
         "candidates": [b64(GOOD)]}), 400, "invalid_base64", "reference"),
    Case("invalid-json", D, raw(b'{"reference": '), 400, "invalid_json"),
    Case("invalid-json-robustness", R, raw(b"{'single': 'quotes'}"), 400, "invalid_json"),
    Case("empty-json-body", D, raw(b""), 400, "invalid_json"),
    Case("null-json", D, raw(b"null"), 422, "validation_error", says="object"),
    Case("null-json-robustness", R, raw(b"null"), 422, "validation_error", says="object"),
    Case("json-array", D, raw(b"[1, 2]"), 422, "validation_error", says="object"),
    Case("multipart-part-without-name", D, raw(NO_NAME, "multipart/form-data; boundary=x"), 400,
         "invalid_multipart", says="name"),
    Case("multipart-bad-header-robustness", R, raw(BAD_HEADER, "multipart/form-data; boundary=x"),
         400, "invalid_multipart"),
    Case("multipart-without-closing-boundary", D, raw(b"--x\r\nbroken",
         "multipart/form-data; boundary=x"), 400, "invalid_multipart", says="closing boundary"),
    Case("multipart-without-boundary", R, raw(b"abc", "multipart/form-data"), 400,
         "invalid_multipart"),
    Case("text-plain", D, raw(b"hello", "text/plain"), 415, "unsupported_media_type"),
    Case("no-content-type", R, raw(b'{"reference": "AA=="}', None), 415, "unsupported_media_type"),
    Case("form-urlencoded", D, {"data": {"reference": "x"}}, 415, "unsupported_media_type"),
    Case("image-body", R, raw(GOOD, "image/jpeg"), 415, "unsupported_media_type"),
    # numbers and names
    Case("nan-threshold-json", D, raw(b'{"reference": "' + b64(GOOD).encode() +
         b'", "candidates": ["' + b64(GOOD).encode() + b'"], "threshold": NaN}'), 422,
         "validation_error", "threshold"),
    Case("infinite-threshold-json", D, raw(b'{"reference": "AA==", "candidates": ["AA=="], '
         b'"threshold": 1e999}'), 422, "validation_error", "threshold"),
    Case("negative-threshold-multipart", D, mp(GOOD, GOOD, data={"threshold": "-1"}), 422,
         "validation_error", "threshold"),
    Case("nan-threshold-multipart", D, mp(GOOD, GOOD, data={"threshold": "nan"}), 422,
         "validation_error", "threshold"),
    Case("threshold-not-a-number", D, js({"reference": b64(GOOD), "candidates": [b64(GOOD)],
         "threshold": "abc"}), 422, "validation_error", "threshold"),
    Case("spatial-not-a-bool", D, mp(GOOD, GOOD, data={"spatial": "maybe"}), 422,
         "validation_error", "spatial"),
    Case("option-given-twice", D, {"files": mp(GOOD, GOOD)["files"],
         "data": {"model": ["lpips-alex", "lpips-alex"]}}, 422, "validation_error", "model"),
    Case("unknown-model-distance", D, mp(GOOD, GOOD, data={"model": "no-such-model"}), 422,
         "validation_error", "model", "no-such-model"),
    Case("unknown-model-robustness", R, js({"reference": b64(GOOD), "models": ["nope"]}), 422,
         "validation_error", "models", "nope"),
    Case("empty-model-name-robustness", R, js({"reference": b64(GOOD), "models": [""]}), 422,
         "validation_error", "models"),
    Case("unknown-attack", R, js({"reference": b64(GOOD), "attack": "l1"}), 422,
         "validation_error", "attack"),
    Case("unknown-goal", R, mp(GOOD, data={"goal": "destroy"}), 422, "validation_error", "goal"),
    Case("nan-epsilon-multipart", R, mp(GOOD, data={"epsilon": "NaN"}), 422, "validation_error",
         "epsilon"),
    Case("epsilon-out-of-range", R, js({"reference": b64(GOOD), "epsilon": 2.0}), 422,
         "validation_error", "epsilon"),
    Case("epsilon-over-cap", R, js({"reference": b64(GOOD), "epsilon": 0.5}), 422,
         "validation_error", "epsilon", "cap"),
    Case("steps-zero", R, js({"reference": b64(GOOD), "steps": 0}), 422, "validation_error",
         "steps"),
    Case("steps-fractional", R, js({"reference": b64(GOOD), "steps": 1.5}), 422,
         "validation_error", "steps"),
    Case("steps-huge", R, js({"reference": b64(GOOD), "steps": 10**30}), 422, "validation_error",
         "steps"),
    Case("steps-over-cap", R, mp(GOOD, data={"steps": "101"}), 422, "validation_error", "steps",
         "cap"),
    Case("seed-negative", R, js({"reference": b64(GOOD), "seed": -5}), 422, "validation_error",
         "seed"),
]  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(tiny_store: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    s = tiny_settings(
        tiny_store,
        max_body_bytes=MAX_BODY,
        max_pixels=MAX_PIXELS,
        max_candidates=MAX_CANDIDATES,
        max_attack_steps=100,
        max_wait_ms=0,
    )
    async with serve(s) as ca:
        yield ca


async def test_the_catalogue_is_large_and_names_are_unique() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 30
    assert {c.endpoint for c in CASES} == {D, R}
    for endpoint in (D, R):  # both encodings, each for both endpoints
        mine = [c for c in CASES if c.endpoint == endpoint]
        assert any("files" in c.request for c in mine) and any("json" in c.request for c in mine)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_input(api: tuple[httpx.AsyncClient, FastAPI], case: Case) -> None:
    client, _ = api
    r = await client.post(case.endpoint, **case.request)
    assert r.status_code == case.status, r.text
    assert r.headers["content-type"] == "application/json"
    assert "Traceback" not in r.text
    body = r.json()
    if case.code is None:
        assert case.check is not None
        case.check(body)
    else:
        err = body["error"]
        assert set(err) <= {"code", "message", "field"}  # no error_id: nothing went wrong inside
        assert err["code"] == case.code and len(err["message"]) > 10, err
        assert err.get("field") == case.field or case.field is None, err
        assert case.says is None or case.says in err["message"], err
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text


async def test_oversize_bodies_are_refused_while_streaming(
    api: tuple[httpx.AsyncClient, FastAPI],
) -> None:
    """Declared too large: refused before any byte is read; undeclared (chunked): refused once the
    running count passes the limit, with most of the body never read."""
    client, _ = api
    chunk, n_chunks = 50_000, 40  # 2 MB offered against a 300 kB limit
    for endpoint in (D, R):
        r = await client.post(endpoint, content=b"x" * (MAX_BODY + 1), headers=raw(b"")["headers"])
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        assert str(MAX_BODY) in r.json()["error"]["message"]
        pulled = 0

        async def body(multipart: bool) -> AsyncIterator[bytes]:
            nonlocal pulled
            if multipart:  # a well-formed start of one huge file part
                yield b'--zz\r\nContent-Disposition: form-data; name="reference"; filename="r"\r\n\r\n'
            for _ in range(n_chunks):
                pulled += 1
                yield b"y" * chunk

        kind = "multipart/form-data; boundary=zz" if endpoint == R else "application/json"
        r = await client.post(endpoint, content=body(endpoint == R), headers={"content-type": kind})
        assert "content-length" not in r.request.headers
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
        assert pulled <= MAX_BODY // chunk + 2, f"{pulled} of {n_chunks} chunks were read"
    assert (await client.get("/readyz")).status_code == 200


async def test_no_request_of_the_catalogue_reached_a_5xx(
    api: tuple[httpx.AsyncClient, FastAPI],
) -> None:
    """Runs last in this module: the server's own count of 5xx answers is still zero."""
    client, _ = api
    text = (await client.get("/metrics")).text
    served = sum(metric(text, "rlpips_requests_total", endpoint=e) for e in (D, R))
    assert served >= len(CASES)
    for status in ("500", "502", "503", "504"):
        assert metric(text, "rlpips_requests_total", status=status) == 0
