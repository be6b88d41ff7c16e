"""``rlpips cluster``: real nginx (rendered from deploy/nginx) in front of two ``rlpips serve`` replicas on
loopback. Load reaches both replicas; SIGTERM to a replica under load loses no request (nginx retries
another replica on 503 ``draining`` and on refused connections, and the cluster restarts the replica);
a 40 MB body gets the LB's own JSON 413; the Python client works through the LB; a 429 with ``Retry-After`` passes through; ``X-Request-ID`` is
echoed through the LB and written in the replica's log.

nginx is required: without it these tests skip, and fail under ``CI=true`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from rlpips_client import Client, ClientError

from app.cli.cluster import nginx_binary
from tests.support import ROOT
from tests.support.apiutil import jpegs, metric, multipart
from tests.support.serverutil import free_port
from tests.support.tools import missing

DRAIN_S = 1.5
IMGS = jpegs(6, start=30)


@dataclass
class Cluster:
    proc: subprocess.Popen[bytes]
    url: str
    state_file: Path
    log_dir: Path

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.state_file.read_text())
        return state

    def replica_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{r['port']}" for r in self.state()["replicas"]]


def _nginx() -> None:
    if nginx_binary() is None:
        missing("nginx is not installed (Debian package nginx; .ci/run installs it)")


@pytest.fixture(scope="module")
def cluster(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    _nginx()
    tmp = tmp_path_factory.mktemp("cluster")
    port = free_port()
    env = os.environ | {
        "RLPIPS_WEIGHTS_DIR": str(weights_dir),
        "RLPIPS_RESOLUTION": "64",
        "RLPIPS_MODELS": "lpips-alex",
        "RLPIPS_DEFAULT_MODEL": "lpips-alex",
        "RLPIPS_MAX_WAIT_MS": "10",
        "RLPIPS_DRAIN_S": str(DRAIN_S),
        "RLPIPS_MAX_ATTACK_JOBS": "1",  # a third concurrent attack on two replicas gets 429
        "RLPIPS_TORCH_THREADS": "1",
    }
    state_file = tmp / "state.json"
    cmd = [sys.executable, "-m", "app.cli", "cluster", "--replicas", "2", "--port", str(port)]
    args = ["--state-file", str(state_file), "--log-dir", str(tmp), "--stop-timeout", "30"]
    with (tmp / "supervisor.log").open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    c = Cluster(proc, f"http://127.0.0.1:{port}", state_file, tmp)
    try:
        _wait(lambda: state_file.exists() and c.state()["nginx_pid"] is not None, proc, tmp, 240)
        yield c
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    supervisor = (tmp / "supervisor.log").read_text()
    assert code == 0, supervisor
    assert "cluster stopped" in supervisor
    for log in tmp.glob("replica-*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def _wait(ready: Any, proc: subprocess.Popen[bytes], tmp: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"cluster not ready: {(tmp / 'supervisor.log').read_text()[-3000:]}")
        time.sleep(0.2)


def _served(urls: list[str], status: str = "200", endpoint: str = "/distance") -> list[float]:
    """``rlpips_requests_total`` of each replica (read from the replica directly)."""
    return [
        metric(
            httpx.get(f"{u}/metrics", timeout=10).text,
            "rlpips_requests_total",
            endpoint=endpoint,
            status=status,
        )
        for u in urls
    ]


def test_load_reaches_both_replicas(cluster: Cluster) -> None:
    urls = cluster.replica_urls()
    before = _served(urls)

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as client:
            sem = asyncio.Semaphore(8)

            async def one(i: int) -> httpx.Response:
                async with sem:
                    files = multipart(IMGS[i % 6], IMGS[(i + 1) % 6])
                    return await client.post("/distance", files=files)

            return await asyncio.gather(*(one(i) for i in range(40)))

    answers = asyncio.run(load())
    assert [r.status_code for r in answers] == [200] * 40
    per_replica = [a - b for a, b in zip(_served(urls), before, strict=True)]
    assert sum(per_replica) == 40 and min(per_replica) > 0, per_replica


def test_request_id_through_the_lb(cluster: Cluster) -> None:
    files = multipart(IMGS[0], IMGS[1])
    given = httpx.post(
        f"{cluster.url}/distance", files=files, headers={"X-Request-ID": "lb-test-4f2a9"}
    )
    assert given.status_code == 200 and given.headers["x-request-id"] == "lb-test-4f2a9"
    made = httpx.post(f"{cluster.url}/distance", files=files)
    assert made.status_code == 200
    generated = made.headers["x-request-id"]  # nginx's $request_id: 32 hex digits
    assert len(generated) == 32 and int(generated, 16) >= 0
    unusable = httpx.post(f"{cluster.url}/distance", files=files, headers={"X-Request-ID": "a b"})
    assert unusable.headers["x-request-id"] not in ("a b", "", generated)
    logs = "".join(p.read_text() for p in cluster.log_dir.glob("replica-*.log"))
    for request_id in ("lb-test-4f2a9", generated):
        lines = [ln for ln in logs.splitlines() if f"[{request_id}]" in ln]
        assert any('"POST /distance HTTP/1.1" 200' in ln for ln in lines), request_id


def test_the_client_library_works_through_the_lb(cluster: Cluster) -> None:
    """rlpips_client against the LB: the same distances as a direct request to a replica, the
    service's error codes, and the request ID the client sends comes back in its errors."""
    direct = httpx.post(f"{cluster.replica_urls()[0]}/distance", files=multipart(*IMGS[:3]))
    expected = [r["distance"] for r in direct.json()["results"]]
    with Client(cluster.url, timeout=30) as client:
        res = client.distance(IMGS[0], IMGS[1:3])
        assert res.distances == pytest.approx(expected, rel=1e-5)
        assert {m.name for m in client.models() if m.loaded} >= {res.model}
        with pytest.raises(ClientError) as caught:
            client.distance(IMGS[0], b"not an image")
    assert caught.value.code == "invalid_image" and caught.value.status == 400
    assert caught.value.request_id


def test_body_over_the_limit_gets_the_lbs_json_413(cluster: Cluster) -> None:
    urls = cluster.replica_urls()
    before = [_served(urls, "413", e) for e in ("/distance", "other")]
    body = b"\0" * (40 * 1024 * 1024)
    headers = {"Content-Type": "application/json", "X-Request-ID": "big-body-1"}
    r = httpx.post(f"{cluster.url}/distance", content=body, headers=headers, timeout=60)
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "payload_too_large"
    assert r.headers["x-request-id"] == "big-body-1"
    assert [_served(urls, "413", e) for e in ("/distance", "other")] == before  # nginx answered


def test_429_with_retry_after_passes_through(cluster: Cluster) -> None:
    """Two replicas with one attack job each: of four concurrent long attacks some get 429."""

    async def attacks() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
            data = {"steps": "100", "models": "lpips-alex"}
            return await asyncio.gather(
                *(
                    client.post("/robustness-check", files=multipart(IMGS[i]), data=data)
                    for i in range(4)
                )
            )

    answers = asyncio.run(attacks())
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "overloaded"
            assert int(r.headers["retry-after"]) >= 1


def test_sigterm_to_a_replica_under_load_loses_no_request(cluster: Cluster) -> None:
    """The rolling-restart path: the replica drains (503 ``draining``: nginx retries the other), closes
    its listener (refused: retried too), exits and is started again by the cluster."""
    victim = cluster.state()["replicas"][0]
    errors: list[str] = []
    done = 0

    async def client_loop(client: httpx.AsyncClient, i: int, stop: asyncio.Event) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                r = await client.post("/distance", files=multipart(IMGS[i % 6], IMGS[(i + 2) % 6]))
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
            done += 1

    async def scenario() -> None:
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as client:
            loops = [asyncio.ensure_future(client_loop(client, i, stop)) for i in range(6)]
            await asyncio.sleep(1.0)
            os.kill(victim["pid"], signal.SIGTERM)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # back: a new pid, ready
                r = cluster.state()["replicas"][0]
                if r["pid"] not in (None, victim["pid"]) and r["ready"]:
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # load on the restarted replica too
            stop.set()
            await asyncio.gather(*loops)

    asyncio.run(scenario())
    after = cluster.state()["replicas"][0]
    assert after["pid"] != victim["pid"] and after["ready"] and after["restarts"] == 1, after
    assert errors == [], errors[:5]
    assert done > 20
    restarted = cluster.replica_urls()[0]
    assert httpx.get(f"{restarted}/readyz", timeout=10).status_code == 200
