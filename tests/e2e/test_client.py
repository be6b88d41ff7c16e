"""The Python client (clients/python) and ``rlpips distance --url`` against a real ``rlpips serve``
process with an API key: the same numbers as a hand-written request, errors with the service's codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rlpips_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ClientError,
    ConnectionFailed,
)

from app.cli.main import main as cli_main
from tests.support import IMAGENET, KODAK
from tests.support.serverutil import Server, free_port, running

pytestmark = pytest.mark.e2e
KEY = "client-test-key"
FILES = sorted(IMAGENET.glob("*.JPEG"))[40:44]


@pytest.fixture(scope="module")
def server(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("client") / "server.log"
    env = {
        "RLPIPS_RESOLUTION": "64",
        "RLPIPS_MODELS": "lpips-alex",
        "RLPIPS_DEFAULT_MODEL": "lpips-alex",
        "RLPIPS_MAX_WAIT_MS": "10",
        "RLPIPS_API_KEYS": KEY,
    }
    with running(weights_dir, log, env) as srv:
        yield srv


def by_hand(server: Server, reference: Path, candidates: list[Path]) -> list[float]:
    """The distances of a hand-written multipart ``POST /distance``."""
    files = [("reference", (reference.name, reference.read_bytes()))]
    files += [("candidate", (c.name, c.read_bytes())) for c in candidates]
    headers = {"X-API-Key": KEY}
    r = httpx.post(f"{server.url}/distance", files=files, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return [p["distance"] for p in r.json()["results"]]


def test_sync_distance_equals_a_hand_written_request(server: Server) -> None:
    expected = by_hand(server, FILES[0], FILES[1:])
    with Client(server.url, api_key=KEY) as client:
        res = client.distance(FILES[0], FILES[1:], per_layer=True)
        same = client.distance(FILES[0].read_bytes(), FILES[0].open("rb"))
    assert res.distances == pytest.approx(expected, abs=1e-5)
    assert res.model == "lpips-alex" and res.resolution == (64, 64)
    assert all(r.per_layer is not None and len(r.per_layer) == 5 for r in res.results)
    assert [r.near_duplicate for r in res.results] == [d <= res.threshold for d in expected]
    assert same.distances == pytest.approx([0.0], abs=1e-6)


async def test_async_distance_equals_a_hand_written_request(server: Server) -> None:
    expected = by_hand(server, FILES[1], [FILES[2], FILES[3]])
    async with AsyncClient(server.url, api_key=KEY) as client:
        res = await client.distance(FILES[1], [FILES[2], FILES[3]], threshold=0.5, spatial=True)
        ready = await client.ready()
    assert ready and res.distances == pytest.approx(expected, abs=1e-5) and res.threshold == 0.5
    assert all(r.spatial_png is not None and r.spatial_png[:4] == b"\x89PNG" for r in res.results)


def test_invariance_and_shared_heat_map_scale(server: Server, tmp_path: Path) -> None:
    from PIL import Image, ImageOps

    mirror = tmp_path / "mirror.png"
    ImageOps.mirror(Image.open(FILES[0])).save(mirror)
    with Client(server.url, api_key=KEY) as client:
        flipped = client.distance(FILES[0], [mirror, FILES[1]], invariance=["hflip"])
        shared = client.distance(FILES[0], FILES[1:3], spatial=True, spatial_scale="shared")
        attacked = client.robustness_check(
            FILES[0],
            mirror,
            models=["lpips-alex"],
            steps=1,
            invariance=["hflip"],
            return_adversarial=True,
        )
    assert flipped.results[0].mirrored is True
    assert flipped.distances[0] < 0.02 < flipped.distances[1]
    tops = {r.spatial_max for r in shared.results}
    assert len(tops) == 1 and next(iter(tops)) is not None
    assert attacked.results[0].clean_distance < 0.02
    assert attacked.attacked_png is not None and attacked.attacked_png[:4] == b"\x89PNG"


def test_robustness_check_with_few_steps(server: Server) -> None:
    with Client(server.url, api_key=KEY) as client:
        res = client.robustness_check(
            KODAK / "kodim23.png", models=["lpips-alex"], steps=2, seed=5, return_adversarial=True
        )
    assert res.attack.steps == 2 and res.attack.seed == 5 and res.attack.attack == "linf"
    [outcome] = res.results
    assert outcome.model == "lpips-alex" and outcome.clean_distance == pytest.approx(0, abs=1e-6)
    assert outcome.adversarial_distance > 0 and outcome.perturbation_linf <= 4 / 255 + 1e-6
    assert outcome.adversarial_png is not None and outcome.adversarial_png[:4] == b"\x89PNG"


async def test_async_robustness_check_and_models(server: Server) -> None:
    async with AsyncClient(server.url, api_key=KEY) as client:
        res = await client.robustness_check(FILES[0], FILES[1], steps=1, goal="impersonate")
        models = await client.models()
    assert [r.model for r in res.results] == ["lpips-alex"]  # lpips-alex is also the default
    assert res.attack.goal == "impersonate" and res.attack.steps == 1
    listed = {m.name: m for m in models}
    assert listed["lpips-alex"].loaded and listed["lpips-alex"].default
    assert not listed["r-lpips-alex-linf-synth"].loaded


def test_errors_carry_the_service_codes(server: Server) -> None:
    with Client(server.url, api_key=KEY) as client:
        with pytest.raises(ClientError) as bad:
            client.distance(FILES[0], [FILES[1], b"not an image"])
        with pytest.raises(ClientError) as unknown:
            client.distance(FILES[0], FILES[1], model="no-such-model")
    assert (bad.value.status, bad.value.code, bad.value.field) == (
        400,
        "invalid_image",
        "candidate[1]",
    )
    assert bad.value.request_id
    assert (unknown.value.status, unknown.value.code) == (422, "validation_error")


def test_the_api_key_is_required_and_sent(server: Server) -> None:
    for key in (None, "wrong"):
        with Client(server.url, api_key=key) as client:
            with pytest.raises(AuthenticationError) as info:
                client.models()
            assert client.health() and client.ready()  # the probes stay open
        assert (info.value.status, info.value.code) == (401, "unauthorized")


def test_cli_distance_with_url_prints_what_the_service_answers(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = by_hand(server, FILES[0], [FILES[2]])[0]
    monkeypatch.setenv("RLPIPS_API_KEY", KEY)  # the --api-key default
    assert cli_main(["distance", str(FILES[0]), str(FILES[2]), "--url", server.url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "lpips-alex" and out["resolution"] == [64, 64]
    assert out["distance"] == pytest.approx(expected, abs=1e-5) and len(out["per_layer"]) == 5
    args = ["distance", str(FILES[0]), str(FILES[2]), "--url", server.url, "--api-key", KEY]
    assert cli_main(args) == 0
    assert float(capsys.readouterr().out) == pytest.approx(expected, abs=1e-5)
    monkeypatch.delenv("RLPIPS_API_KEY")
    assert cli_main(["distance", str(FILES[0]), str(FILES[2]), "--url", server.url]) == 2
    assert "unauthorized" in capsys.readouterr().err


def test_cli_error_exit_status(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"junk")
    args = ["distance", str(FILES[0]), str(junk), "--url", server.url, "--api-key", KEY]
    assert cli_main(args) == 2
    assert "invalid_image (candidate[0])" in capsys.readouterr().err
    closed = f"http://127.0.0.1:{free_port()}"
    assert cli_main(["distance", str(FILES[0]), str(junk), "--url", closed]) == 1
    assert "connection_error" in capsys.readouterr().err


def test_a_closed_port_is_retried_then_raises_connection_failed() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retries=2, backoff=0.01) as client, pytest.raises(ConnectionFailed) as info:
        client.models()
    assert info.value.status is None and info.value.code == "connection_error"
