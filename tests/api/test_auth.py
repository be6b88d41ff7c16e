"""Optional API keys (``RLPIPS_API_KEYS``): Bearer or X-API-Key, one 401 body for every failure,
probes open or closed by setting, constant-time comparison, keys never logged (on the tiny random-weight
store: no assertion here depends on distance values)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from app.api import auth
from app.config import Settings
from tests.support.apiutil import metric, multipart, serve, tiny_settings
from tests.support.badinputs import jpeg, png_of

KEYS = ("k3y-alpha-0123456789", "k3y-beta-9876543210")


def unauthorized(r: httpx.Response) -> str:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    err = r.json()["error"]
    assert set(err) == {"code", "message"} and err["code"] == "unauthorized"
    return r.text


async def test_keys_are_required_and_every_refusal_looks_the_same(
    tiny_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = tiny_settings(tiny_store, api_keys=",".join(KEYS))
    files = multipart(jpeg(), png_of())
    with caplog.at_level(logging.DEBUG):
        async with serve(s) as (client, _):
            for key in KEYS:
                for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
                    r = await client.post("/distance", files=files, headers=headers)
                    assert r.status_code == 200, r.text
            r = await client.post(
                "/distance", files=files, headers={"authorization": f"bearer {KEYS[0]}"}
            )
            assert r.status_code == 200, "the scheme is case-insensitive"
            refusals = [
                {},
                {"Authorization": f"Bearer {KEYS[0][:-1]}"},  # a prefix of a valid key
                {"Authorization": f"Bearer {KEYS[0]}x"},
                {"Authorization": f"Basic {KEYS[0]}"},  # right key, wrong scheme
                {"Authorization": "Bearer"},
                {"X-API-Key": ""},
                {"X-API-Key": "wrong"},
                {"X-Api-Key": KEYS[0].upper()},
            ]
            bodies = {
                unauthorized(await client.post("/distance", files=files, headers=h))
                for h in refusals
            }
            assert len(bodies) == 1  # nothing tells which part failed
            unauthorized(await client.get("/models"))
            unauthorized(await client.post("/robustness-check", json={"reference": "AA=="}))
            unauthorized(await client.get("/no-such-path"))  # no hint about what exists
            unauthorized(await client.get("/openapi.json"))
            for probe in ("/healthz", "/readyz", "/metrics"):  # open by default
                assert (await client.get(probe)).status_code == 200
            text = (await client.get("/metrics")).text
            assert metric(text, "rlpips_requests_total", status="401") == len(refusals) + 4
    assert "API keys required (2 configured)" in caplog.text
    for key in KEYS:
        assert key not in caplog.text and key.upper() not in caplog.text
        assert key not in repr(s) and key not in str(s.model_dump())


async def test_probes_can_be_closed(tiny_store: Path) -> None:
    s = tiny_settings(tiny_store, api_keys=[KEYS[0]], open_probes=False)
    async with serve(s) as (client, _):
        for probe in ("/healthz", "/readyz", "/metrics"):
            unauthorized(await client.get(probe))
            ok = await client.get(probe, headers={"X-API-Key": KEYS[0]})
            assert ok.status_code == 200


async def test_without_keys_everything_is_open(tiny_store: Path) -> None:
    async with serve(tiny_settings(tiny_store)) as (client, _):
        r = await client.post("/distance", files=multipart(jpeg(), png_of()))
        assert r.status_code == 200, r.text


def test_keys_come_from_the_environment_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLPIPS_API_KEYS", f" {KEYS[0]} ,{KEYS[1]},")
    monkeypatch.setenv("RLPIPS_OPEN_PROBES", "false")
    s = Settings()
    assert [k.get_secret_value() for k in s.api_keys] == list(KEYS)
    assert not s.open_probes


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each check runs ``hmac.compare_digest`` on equal-length digests against every configured key,
    also when the first one already matched (no early exit that timing could reveal)."""
    calls: list[tuple[int, int]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = [Settings(api_keys=list(KEYS)).api_keys[i] for i in range(2)]
    mw = auth.ApiKeyMiddleware(app=None, keys=keys, open_paths=())  # type: ignore[arg-type]
    assert mw.valid(KEYS[0]) and mw.valid(KEYS[1]) and not mw.valid("x" * 500)
    assert calls == [(32, 32)] * 6
