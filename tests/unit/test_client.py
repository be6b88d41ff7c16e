"""The Python client (clients/python) against fake transports: retries, backoff, ``Retry-After``, error
mapping, what goes on the wire, inputs, typed results, and its dependencies (httpx only)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import tomllib
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest
from PIL import Image
from rlpips_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ClientError,
    ConnectionFailed,
    RateLimitedError,
    RequestTimeout,
    ServerError,
    UnavailableError,
)

from tests.support import ROOT

CLIENT_DIR = ROOT / "clients" / "python"
PAIR = {"distance": 0.25, "near_duplicate": True}
DISTANCE = {
    "model": "lpips-alex",
    "resolution": [64, 64],
    "threshold": 0.4578,
    "results": [PAIR],
    "timing_ms": {"decode": 1.0, "queue": 2.0, "inference": 3.0, "total": 6.5},
}
Step = httpx.Response | Exception


def error(status: int, code: str, field: str | None = None, **headers: str) -> httpx.Response:
    err = {"code": code, "message": f"{code} happened"} | ({"field": field} if field else {})
    return httpx.Response(status, json={"error": err}, headers=headers)


class Script:
    """A transport handler that answers with ``steps`` in order and records every request."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def client(script: Script, waits: list[float], **kw: object) -> Client:
    return Client(
        "http://svc",
        transport=httpx.MockTransport(script),
        sleep=waits.append,
        **kw,  # type: ignore[arg-type]
    )


def test_503_twice_then_200_waits_with_growing_jittered_backoff() -> None:
    script, waits = (
        Script(error(503, "draining"), error(503, "draining"), httpx.Response(200, json=DISTANCE)),
        [],
    )
    with client(script, waits, backoff=0.1) as c:
        result = c.distance(b"ref", [b"cand"])
    assert result.distances == [0.25] and len(script.requests) == 3
    assert 0.05 <= waits[0] <= 0.1 and 0.1 <= waits[1] <= 0.2  # backoff·2ⁿ, half to all of it
    ids = {r.headers["x-request-id"] for r in script.requests}
    assert len(ids) == 1  # one request ID for every attempt of a call


def test_retry_after_is_honoured_on_429() -> None:
    script, waits = (
        Script(
            error(429, "overloaded", **{"Retry-After": "2"}), httpx.Response(200, json=DISTANCE)
        ),
        [],
    )
    with client(script, waits, backoff=0.01) as c:
        c.distance(b"ref", b"cand")
    assert len(waits) == 1 and 2.0 <= waits[0] <= 2.2  # the server's hint, plus up to 10 % jitter


def test_attempts_are_bounded_and_the_last_error_is_raised() -> None:
    script, waits = (
        Script(*(error(503, "not_ready", **{"X-Request-ID": "abc"}) for _ in range(3))),
        [],
    )
    with client(script, waits, retries=2, backoff=0) as c, pytest.raises(UnavailableError) as info:
        c.distance(b"ref", b"cand")
    assert len(script.requests) == 3 and waits == [0.0, 0.0]
    e = info.value
    assert (e.status, e.code, e.message, e.request_id) == (
        503,
        "not_ready",
        "not_ready happened",
        "abc",
    )


def test_a_retry_after_beyond_the_limit_is_not_waited_for() -> None:
    script, waits = Script(error(429, "overloaded", **{"Retry-After": "600"})), []
    with client(script, waits) as c, pytest.raises(RateLimitedError) as info:
        c.distance(b"ref", b"cand")
    assert waits == [] and info.value.retry_after == 600 and info.value.code == "overloaded"


@pytest.mark.parametrize(
    ("response", "kind", "code"),
    [
        (error(400, "invalid_image", "candidate[0]"), ClientError, "invalid_image"),
        (error(401, "unauthorized"), AuthenticationError, "unauthorized"),
        (error(422, "validation_error", "threshold"), ClientError, "validation_error"),
        (error(500, "internal_error"), ServerError, "internal_error"),
        (error(504, "deadline_exceeded"), ServerError, "deadline_exceeded"),
        (
            httpx.Response(413, text="<html>413 Request Entity Too Large</html>"),
            ClientError,
            "http_413",
        ),
    ],
)
def test_errors_that_are_not_retried_map_to_exceptions(
    response: httpx.Response, kind: type[Exception], code: str
) -> None:
    script, waits = Script(response), []
    with client(script, waits) as c, pytest.raises(kind) as info:
        c.distance(b"ref", b"cand")
    assert len(script.requests) == 1 and waits == []
    assert info.value.code == code and info.value.status == response.status_code
    if code == "invalid_image":
        assert info.value.field == "candidate[0]"


def test_a_proxy_502_page_is_retried_then_raised_with_its_status() -> None:
    page = httpx.Response(502, text="<html>bad gateway</html>")
    script, waits = Script(page, page), []
    with client(script, waits, retries=1) as c, pytest.raises(ServerError) as info:
        c.models()
    assert len(script.requests) == 2 and info.value.code == "http_502"


def test_connection_errors_are_retried_but_read_timeouts_are_not() -> None:
    refused = httpx.ConnectError("refused")
    script, waits = (
        Script(refused, httpx.RemoteProtocolError("closed"), httpx.Response(200, json=DISTANCE)),
        [],
    )
    with client(script, waits) as c:
        assert c.distance(b"ref", b"cand").results[0].near_duplicate
    assert len(waits) == 2
    script, waits = Script(httpx.ReadTimeout("slow")), []
    with client(script, waits) as c, pytest.raises(RequestTimeout) as info:
        c.distance(b"ref", b"cand")
    assert waits == [] and info.value.status is None and info.value.code == "timeout"
    script, waits = Script(*(refused for _ in range(4))), []
    with client(script, waits) as c, pytest.raises(ConnectionFailed) as failed:
        c.distance(b"ref", b"cand")
    assert len(script.requests) == 4 and failed.value.code == "connection_error"


def test_the_request_is_multipart_with_the_options_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(b"REFBYTES")
    pil = Image.new("RGB", (4, 4), (1, 2, 3))
    script, waits = Script(httpx.Response(200, json=DISTANCE | {"results": [PAIR] * 3})), []
    with client(script, waits, api_key="sekrit") as c:
        c.distance(
            path, [b"C0", io.BytesIO(b"C1"), pil], model="lpips-alex", threshold=0.5, per_layer=True
        )
    [req] = script.requests
    assert req.url.path == "/distance" and req.headers["authorization"] == "Bearer sekrit"
    assert req.headers["content-type"].startswith("multipart/form-data")
    body = req.read()
    assert b'name="reference"; filename="ref.png"' in body and b"REFBYTES" in body
    assert body.count(b'name="candidate"') == 3 and b"C0" in body and b"C1" in body
    assert b"\x89PNG" in body  # the PIL image, encoded as PNG
    for name, text in (("model", b"lpips-alex"), ("threshold", b"0.5"), ("per_layer", b"true")):
        assert f'name="{name}"'.encode() + b"\r\n\r\n" + text in body
    assert b'name="spatial"' not in body  # left at the service's default


def test_results_are_typed_and_keep_the_raw_body() -> None:
    png = base64.b64encode(b"\x89PNGheat").decode()
    pair = PAIR | {"per_layer": [0.1, 0.15], "spatial_png": png}
    script, waits = Script(httpx.Response(200, json=DISTANCE | {"results": [pair]})), []
    with client(script, waits) as c:
        r = c.distance(b"ref", b"cand", spatial=True, per_layer=True)
    assert r.resolution == (64, 64) and r.threshold == 0.4578 and r.timing_ms.total == 6.5
    assert r.threshold_source is None and r.false_match_rate is None  # an older service: not said
    basis = {"source": "calibrated", "false_match_rate": 1e-05}
    script = Script(httpx.Response(200, json=DISTANCE | {"threshold_basis": basis}))
    with client(script, []) as c:
        said = c.distance(b"ref", b"cand")
    assert said.threshold_source == "calibrated" and said.false_match_rate == 1e-5
    assert r.results[0].per_layer == (0.1, 0.15) and r.results[0].spatial_png == b"\x89PNGheat"
    assert r.raw["results"][0]["spatial_png"] == png
    with pytest.raises(AttributeError):
        r.model = "other"  # type: ignore[misc]


def test_robustness_check_sends_every_option() -> None:
    body = {
        "attack": {
            "attack": "l2",
            "epsilon": 0.5,
            "steps": 2,
            "step_size": 0.1,
            "goal": "impersonate",
            "random_start": False,
            "seed": 7,
        },
        "resolution": [64, 64],
        "results": [
            {
                "model": "lpips-alex",
                "clean_distance": 0.1,
                "adversarial_distance": 0.3,
                "change": 0.2,
                "clean_match": True,
                "adversarial_match": True,
                "flipped": False,
                "perturbation": {"linf": 0.01, "l2": 0.4},
            }
        ],
        "timing_ms": {"decode": 1, "queue": 0, "inference": 5, "total": 7},
    }
    script, waits = Script(httpx.Response(200, json=body)), []
    with client(script, waits) as c:
        r = c.robustness_check(
            b"ref",
            b"cand",
            models=["lpips-alex", "x"],
            attack="l2",
            epsilon=0.5,
            steps=2,
            step_size=0.1,
            goal="impersonate",
            random_start=False,
            seed=7,
            threshold=0.3,
            return_adversarial=True,
        )
    sent = script.requests[0].read()
    expected = {
        "models": b"lpips-alex,x",
        "attack": b"l2",
        "epsilon": b"0.5",
        "steps": b"2",
        "step_size": b"0.1",
        "goal": b"impersonate",
        "random_start": b"false",
        "seed": b"7",
        "threshold": b"0.3",
        "return_adversarial": b"true",
    }
    for name, text in expected.items():
        assert f'name="{name}"'.encode() + b"\r\n\r\n" + text + b"\r\n" in sent
    assert (
        r.attack.seed == 7
        and r.results[0].perturbation_l2 == 0.4
        and r.results[0].adversarial_png is None
    )


def test_inputs_of_the_wrong_kind_are_refused_before_sending(tmp_path: Path) -> None:
    script, waits = Script(), []
    with client(script, waits) as c:
        with pytest.raises(TypeError):
            c.distance(b"ref", [42])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="binary"):
            c.distance(io.StringIO("text"), b"cand")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            c.distance(b"ref", [])
        with pytest.raises(FileNotFoundError):
            c.distance(tmp_path / "missing.png", b"cand")
    assert script.requests == []


async def test_the_async_client_retries_and_maps_errors_the_same_way() -> None:
    script = Script(
        error(503, "draining"),
        httpx.Response(200, json=DISTANCE),
        error(400, "invalid_image", "reference"),
    )
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    transport = httpx.MockTransport(script)
    async with AsyncClient("http://svc", transport=transport, backoff=0.1, sleep=sleep) as c:
        assert (await c.distance(b"ref", b"cand")).distances == [0.25]
        with pytest.raises(ClientError) as info:
            await c.distance(b"bad", b"cand")
    assert len(waits) == 1 and 0.05 <= waits[0] <= 0.1
    assert info.value.code == "invalid_image" and info.value.field == "reference"


def test_the_distribution_depends_on_httpx_only() -> None:
    meta = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "rlpips-client"
    assert [d.split(">")[0].split("=")[0] for d in meta["dependencies"]] == ["httpx"]
    assert "optional-dependencies" not in meta


def test_importing_the_client_loads_no_torch_numpy_or_pillow() -> None:
    code = "import sys, rlpips_client; print(sorted({'torch', 'numpy', 'PIL'} & set(sys.modules)))"
    env = os.environ | {"PYTHONPATH": str(CLIENT_DIR)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_retry_after_reads_seconds_and_http_dates() -> None:
    from rlpips_client._retry import parse_retry_after

    now = 1_700_000_000.0
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(formatdate(now + 7, usegmt=True), now=now) == 7.0
    assert parse_retry_after(formatdate(now - 7, usegmt=True), now=now) == 0.0  # already past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
