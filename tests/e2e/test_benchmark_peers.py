"""The benchmark harness against real servers (issue 7): each peer, started as the harness starts it,
answers like the model, and stopping it leaves no process behind."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.imaging import load_tensor
from app.metric.store import ModelStore
from benchmarks.run import _parse, process_tree, start_server, stop_server

pytestmark = pytest.mark.e2e

RES = 64


def _jpeg_pair(images_dir: Path) -> tuple[bytes, bytes]:
    files = sorted((images_dir / "imagenet-sample").glob("*.JPEG"))
    return files[0].read_bytes(), files[1].read_bytes()


@pytest.mark.parametrize("target", ["litserve", "naive", "service"])
def test_peer_answers_like_the_model(
    target: str,
    images_dir: Path,
    store: ModelStore,
    weights_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Started as the harness starts it (own process group, per-target readiness URL), each server answers
    one real JPEG pair with the distance LPIPS gives directly, and stopping it leaves no process behind."""
    ref, cand = _jpeg_pair(images_dir)
    with torch.inference_mode():
        x0, x1 = load_tensor(ref, RES)[None], load_tensor(cand, RES)[None]
        expected = float(store.load("lpips-alex")(x0, x1)[0])
    args = _parse(["--resolution", str(RES), "--targets", target])
    monkeypatch.setenv("RLPIPS_WEIGHTS_DIR", str(weights_dir))
    proc, url, _ = start_server(target, args)
    try:
        files = [
            ("reference", ("a.jpg", ref, "image/jpeg")),
            ("candidate", ("b.jpg", cand, "image/jpeg")),
        ]
        r = httpx.post(f"{url}/distance", files=files, timeout=60)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        got = body["results"][0]["distance"] if target == "service" else body["distance"]
        tree = process_tree(proc.pid)
        if target == "litserve":  # launcher, manager, resource tracker, inference worker, uvicorn
            assert len(tree) >= 4, tree
    finally:
        stop_server(proc)
    assert abs(got - expected) <= 1e-4, (got, expected)
    left = _left_behind(tree)
    assert not left, f"processes left behind: {left}"


def _left_behind(tree: set[int], timeout_s: float = 5.0) -> list[int]:
    """The processes of ``tree`` still alive (neither gone nor zombie) after up to ``timeout_s``:
    ``stop_server``'s SIGKILL is delivered asynchronously, so a loaded machine may show a killed process
    as still running for a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in tree if _state(p) not in ("gone", "Z")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
