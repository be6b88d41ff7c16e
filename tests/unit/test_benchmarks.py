"""The benchmark harness (issue 7), without servers: the summary takes ratios within each repeat, the
plot writes one panel per resolution, 1-to-N payloads are what they claim to be, the profile breakdown
groups samples by stage (the peers against real servers: ``tests/e2e/test_benchmark_peers.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from benchmarks.loadgen import fanout_bodies
from benchmarks.plot import plot
from benchmarks.summary import summarize, table


def _level(pairs_per_s: float, p50: float = 10.0) -> dict[str, Any]:
    return {
        "pairs_per_s": pairs_per_s,
        "p50_ms": p50,
        "p95_ms": 2 * p50,
        "p99_ms": 3 * p50,
        "cpu_ms_per_pair": 1000 / pairs_per_s,
        "client_cpu_ms_per_pair": 1.0,
        "errors": 0,
    }


def _server(rates: dict[int, float], p50_c1: float = 10.0) -> dict[str, Any]:
    levels = {str(c): _level(r, p50_c1 if c == 1 else 50.0) for c, r in rates.items()}
    return {"startup_s": 5.0, "levels": levels}


def _raw(pairs_per_s: float, single_ms: float) -> dict[str, Any]:
    return {
        "batch": {
            "batch": 32,
            "pairs_per_s": pairs_per_s,
            "cpu_ms_per_pair": 2.0,
            "batch_ms": 90.0,
        },
        "single": {"batch": 1, "pairs_per_s": 1000 / single_ms, "batch_ms": single_ms},
    }


def _synthetic_runs() -> dict[str, list[dict[str, Any]]]:
    """Three repeats where the median of the per-repeat ratios differs from the ratio of the medians."""
    return {
        "service": [
            _server({1: 10, 8: 10}, 8.0),
            _server({1: 40, 8: 40}, 9.0),
            _server({1: 30, 8: 30}, 10.0),
        ],
        "raw": [_raw(20, 4.0), _raw(20, 4.0), _raw(60, 4.0)],
        "naive": [_server({1: 5, 8: 5}), _server({1: 40, 8: 40}), _server({1: 60, 8: 10})],
        "litserve": [_server({1: 10, 8: 10})] * 3,
        "cached": [_server({1: 30, 8: 30}), _server({1: 60, 8: 60}), _server({1: 30, 8: 45})],
    }


def test_summary_takes_ratios_within_each_repeat() -> None:
    s = summarize(_synthetic_runs(), [1, 8])
    over_raw = s["ratios"]["service/raw"]["8"]
    assert over_raw["per_repeat"] == pytest.approx([0.5, 2.0, 0.5])
    assert over_raw["median"] == pytest.approx(
        0.5
    )  # the ratio of the medians would be 30 / 20 = 1.5
    assert s["ratios"]["service/naive"]["1"]["per_repeat"] == pytest.approx([2.0, 1.0, 0.5])
    assert s["ratios"]["service/naive"]["8"]["median"] == pytest.approx(2.0)  # 2, 1, 3
    assert s["ratios"]["service/litserve"]["8"]["median"] == pytest.approx(3.0)
    assert s["ratios"]["cached/service"]["8"]["per_repeat"] == pytest.approx([3.0, 1.5, 1.5])
    service = s["targets"]["service"]
    assert service["8"]["pairs_per_s"] == 30
    assert service["1"]["p50_ms"] == 9.0
    raw = s["targets"]["raw"]
    assert (raw["pairs_per_s"], raw["single_pair_ms"], raw["batch"]) == (20, 4.0, 32)
    check = s["checks"]["p50_c1_minus_single_pair_ms"]
    assert check["per_repeat"] == pytest.approx([4.0, 5.0, 6.0])
    assert check["median"] == pytest.approx(5.0) and check["met"]
    text = table(s, 3)
    assert "service/raw at c=8: median 0.50 (per repeat: 0.50, 2.00, 0.50)" in text
    assert "| raw (batch 32) | 20.0 (20.0, 20.0, 60.0) |" in text


def test_summary_without_concurrency_one_or_raw_has_no_latency_check() -> None:
    runs = _synthetic_runs()
    s = summarize({"service": runs["service"], "naive": runs["naive"]}, [8])
    assert set(s["ratios"]) == {"service/naive"}
    assert s["checks"] == {}


def test_plot_writes_one_panel_per_resolution(tmp_path: Path) -> None:
    paths = []
    for res in (64, 256):
        doc = {"args": {"resolution": res}, "summary": summarize(_synthetic_runs(), [1, 8])}
        paths.append(tmp_path / f"cpu-{res}.json")
        paths[-1].write_text(json.dumps(doc))
    out = tmp_path / "plots" / "throughput.png"
    plot(paths, out)
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == (2 * 6 * 120, int(4.5 * 120))  # two 6 x 4.5 inch panels at 120 dpi


def test_fanout_bodies_share_references_and_spread_candidates(tmp_path: Path) -> None:
    for i in range(11):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(tmp_path / f"img{i:02d}.JPEG")
    bodies = fanout_bodies(tmp_path, candidates=3, references=2)
    assert len(bodies) == 3  # 9 candidate images, 3 per body, none repeated
    assert all(b.pairs == 3 for b in bodies)
    names = [
        re.findall(rb'name="(reference|candidate)"; filename="(img\d+)', b.content) for b in bodies
    ]
    refs = [n[0] for n in names]  # the reference part comes first and cycles over 2 images
    assert refs == [(b"reference", b"img00"), (b"reference", b"img01"), (b"reference", b"img00")]
    candidates = [f for n in names for kind, f in n[1:] if kind == b"candidate"]
    assert len(candidates) == len(set(candidates)) == 9  # every other image, once


def test_profile_breakdown_groups_busy_samples_by_stage() -> None:
    from benchmarks.profile import breakdown

    raw = "\n".join(
        [
            "thread (0x1): MainThread;run (uvicorn);parse (multipart) 30",
            "thread (0x2): rlpips-decode-normal_0;_worker (concurrent/futures/thread.py:83);"
            "Runtime._prepare (app/serving/runtime.py:240);ImageFile.load (PIL/ImageFile.py:300) 40",
            "thread (0x2): rlpips-decode-normal_0;Runtime._prepare (app/serving/runtime.py:240);"
            "Image.resize (PIL/Image.py:2200) 20",
            "thread (0x3): rlpips-stream_0;_forward (app/engine.py:400);conv (torch) 10",
            "thread (0x4): rlpips-decode_1;_worker (concurrent/futures/thread.py:83);"
            "get (queue.py:171) 500",
        ]
    )
    shares = breakdown(raw)
    assert shares == pytest.approx(
        {"decode: jpeg decode": 0.4, "http/asyncio": 0.3, "decode: resize": 0.2, "model": 0.1}
    )
