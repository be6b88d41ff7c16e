"""Where a loaded service spends its time: py-spy samples of every thread, grouped by stage.

Starts ``rlpips serve`` (``lpips-alex``, reference cache off) like ``benchmarks.run``, puts it under
closed-loop load at ``--concurrency``, and records the server with py-spy (``--nonblocking``, all threads,
raw collapsed stacks) after a warm-up. Samples whose innermost frame is a wait (condition, queue, selector,
idle pool) are dropped. The remaining *busy* samples are grouped into stages by the frames they contain,
first match wins:

* ``decode``: inside ``Runtime._prepare`` (headers: ``Runtime._headers``) (split into jpeg decode, resize, to tensor and hash);
* ``model``: inside the engine's trunk forward, normalisation and heads;
* ``http/asyncio``: the event loop thread (uvicorn, FastAPI, multipart parsing, the batcher);
* ``other``: everything else.

    python -m benchmarks.profile --resolution 64 --out /tmp/profile-64.txt
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

from benchmarks.loadgen import IMAGENET, pair_bodies, run_load
from benchmarks.run import _parse, start_server, stop_server

WAITS = ("wait (threading", "get (queue", "select (selectors", "_worker (concurrent/futures")
#: (stage, frame-name substrings); first match wins, so the finer decode stages come first.
STAGES = (
    ("decode: jpeg decode", ("ImageFile.load",)),
    ("decode: resize", ("Image.resize",)),
    ("decode: to tensor", ("to_tensor",)),
    ("decode: content hash", ("content_key",)),
    ("decode: other", ("Runtime._prepare", "Runtime._headers")),
    ("model", ("_forward", "distance_from_features", "Engine.")),
)


def stage_of(thread: str, frames: list[str]) -> str:
    names = [f.split(" (")[0] for f in frames]
    for stage, keys in STAGES:
        if any(k in n for n in names for k in keys):
            return stage
    return "http/asyncio" if "MainThread" in thread else "other"


def breakdown(raw: str) -> dict[str, float]:
    """Shares of busy samples per stage from py-spy's raw (collapsed) output."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        thread, *frames = stack.split(";")
        if not frames or any(w in frames[-1] for w in WAITS):
            continue
        counts[stage_of(re.sub(r"\(.*?\)", "", thread), frames)] += int(n)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.most_common()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0, help="recorded seconds")
    p.add_argument("--out", type=Path, default=Path("/tmp/rlpips-profile.txt"))
    a = p.parse_args()
    args = _parse(["--resolution", str(a.resolution), "--targets", "service"])
    bodies = pair_bodies(IMAGENET, args.pairs)
    proc, url, _ = start_server("service", args)
    try:
        load = threading.Thread(
            target=lambda: asyncio.run(run_load(url, bodies, a.concurrency, a.seconds + 4, 4.0))
        )
        load.start()
        threading.Event().wait(6.0)  # warm-up under load before recording
        spy = Path(sys.executable).with_name("py-spy")
        cmd = [
            str(spy) if spy.exists() else "py-spy",
            "record",
            "--pid",
            str(proc.pid),
            "--nonblocking",
            "--threads",
        ]
        cmd += ["-r", "100", "-f", "raw", "-d", str(int(a.seconds)), "-o", str(a.out)]
        subprocess.run(cmd, check=True, capture_output=True)
        load.join()
    finally:
        stop_server(proc)
    shares = breakdown(a.out.read_text())
    print(json.dumps({"resolution": a.resolution, "concurrency": a.concurrency, "busy": shares}))


if __name__ == "__main__":
    main()
