"""Raw batched model throughput on pre-decoded, pre-resized real image pairs — no HTTP, decode or queue.

Two ways of running the same ``lpips-alex`` model, each on batches of ``--batch`` distinct pairs:

* ``engine``: the service's engine with the service's device, precision and thread settings
  (``RLPIPS_DEVICE``, ``RLPIPS_PRECISION``, ``RLPIPS_CPU_STREAMS``,
  ``RLPIPS_TORCH_THREADS``; defaults as the service resolves them);
* ``plain``: ``LPIPS(x0, x1)`` with torch's own intra-op threading (or ``RLPIPS_TORCH_THREADS``).

``pairs_per_s`` is the better of the two — the ceiling the service is measured against. Each variant also
reports the median wall time of one batch (``*_batch_ms``); at ``--batch 1`` the better of the two is the
single-pair inference time (``batch_ms``) that issue 7's concurrency-1 latency target is compared with.
Several batch sizes (``--batch 32,1``) run in one process, one JSON line each.

``--independent N`` measures instead the machine's best raw figure (issue 15): N processes at once, each
the plain model with one intra-op thread, channels-last, on its own pairs, measured over the same
window; ``pairs_per_s`` is their sum.

    python -m benchmarks.raw --resolution 256 --batch 32 --duration 30
    python -m benchmarks.raw --resolution 64 --batch 32,1 --duration 10
    python -m benchmarks.raw --resolution 256 --batch 16 --duration 20 --independent 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from app.config import Settings, pick_device, resolve_precision
from app.imaging import load_tensor
from app.metric.engine import Engine
from app.metric.queries import Image, Query
from app.serving.runtime import cpu_threads
from benchmarks.loadgen import IMAGENET


def _rate(
    step: Callable[[], int], duration_s: float, warmup_s: float
) -> tuple[float, float, float]:
    """``(pairs per second, CPU ms per pair, median ms per step)`` of ``step`` (returns its pairs)."""
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:
        step()
    pairs, steps = 0, []
    started, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() < started + duration_s:
        t0 = time.perf_counter()
        pairs += step()
        steps.append(time.perf_counter() - t0)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
    return pairs / elapsed, 1000 * cpu / pairs, 1000 * statistics.median(steps)


def raw_throughput(
    resolution: int, batch: int, duration_s: float, warmup_s: float = 3.0
) -> dict[str, float]:
    """Pairs/s, CPU ms/pair and median ms per batch of ``lpips-alex`` as ``engine`` and ``plain``; the
    better one (by pairs/s) as ``pairs_per_s`` / ``cpu_ms_per_pair``, the faster batch as ``batch_ms``."""
    settings = Settings()
    store = settings.store()
    files = sorted(IMAGENET.glob("*.JPEG"))[: 4 * batch]
    images = [Image(load_tensor(f.read_bytes(), resolution), f.name) for f in files]
    batches = [
        [Query("lpips-alex", images[i], (images[i + 1],)) for i in range(j, j + 2 * batch, 2)]
        for j in range(0, len(images) - 2 * batch + 1, 2 * batch)
    ]
    default_threads = torch.get_num_threads()
    out: dict[str, float] = {}

    device = pick_device(settings.device)
    streams, threads = cpu_threads(settings, device)
    torch.set_num_threads(threads or default_threads)
    precision = resolve_precision(settings.precision, device)
    engine = Engine(
        store,
        ["lpips-alex"],
        device,
        resolution,
        streams=streams,
        precision=precision,
        channels_last=settings.channels_last,
    )
    engine.load()
    k = iter(range(1 << 62))

    def engine_step() -> int:
        qs = batches[next(k) % len(batches)]
        engine.compute(qs, use_cache=False)
        return len(qs)

    out["engine"], out["engine_cpu_ms_per_pair"], out["engine_batch_ms"] = _rate(
        engine_step, duration_s, warmup_s
    )

    torch.set_num_threads(settings.torch_threads or default_threads)
    metric = store.load("lpips-alex", device)
    stacked = [
        (
            torch.stack([q.reference.tensor for q in qs]).to(device),
            torch.stack([q.candidates[0].tensor for q in qs]).to(device),
        )
        for qs in batches
    ]

    def plain_step() -> int:
        x0, x1 = stacked[next(k) % len(stacked)]
        with torch.inference_mode():
            metric(x0, x1).cpu()  # waits for the device
        return int(x0.shape[0])

    out["plain"], out["plain_cpu_ms_per_pair"], out["plain_batch_ms"] = _rate(
        plain_step, duration_s, warmup_s
    )
    best = "engine" if out["engine"] >= out["plain"] else "plain"
    out["pairs_per_s"] = out[best]
    out["cpu_ms_per_pair"] = out[f"{best}_cpu_ms_per_pair"]
    out["batch_ms"] = min(out["engine_batch_ms"], out["plain_batch_ms"])
    return out


def independent(resolution: int, batch: int, duration_s: float, processes: int) -> dict[str, float]:
    """``processes`` single-threaded plain-model processes measured over one common window (each
    warms up, then waits for the same start time); their pairs/s summed."""
    start = time.time() + 20.0  # loading takes a few seconds per process on a busy machine
    cmd = [sys.executable, "-m", "benchmarks.raw", "--resolution", str(resolution),
           "--batch", str(batch), "--duration", str(duration_s), "--start-at", str(start)]  # fmt: skip
    procs = [
        subprocess.Popen([*cmd, "--offset", str(k)], stdout=subprocess.PIPE, text=True)
        for k in range(processes)
    ]
    rates = [json.loads(p.communicate()[0].splitlines()[-1])["pairs_per_s"] for p in procs]
    return {"pairs_per_s": sum(rates), "processes": processes, "per_process": rates}


def _one_process(resolution: int, batch: int, duration_s: float, start: float, k: int) -> float:
    """One process of :func:`independent`: plain model, 1 thread, channels-last, distinct pairs."""
    torch.set_num_threads(1)
    files = sorted(IMAGENET.glob("*.JPEG"))[4 * batch * k : 4 * batch * (k + 1)]
    x = torch.stack([load_tensor(f.read_bytes(), resolution) for f in files])
    x = x.contiguous(memory_format=torch.channels_last)
    metric = Settings().store().load("lpips-alex").to(memory_format=torch.channels_last)
    pairs = [(x[i : i + batch], x[i + batch : i + 2 * batch]) for i in (0, 2 * batch)]
    n, k_iter = 0, iter(range(1 << 62))
    with torch.inference_mode():
        while time.time() < start:
            metric(*pairs[0])
        while time.time() < start + duration_s:
            metric(*pairs[next(k_iter) % 2])
            n += batch
        return n / (time.time() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", default="32", help="batch size(s), comma-separated")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per variant")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--independent", type=int, default=0, help="N single-thread processes at once")
    p.add_argument("--start-at", type=float, help=argparse.SUPPRESS)  # one --independent process
    p.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    batch = int(args.batch.split(",")[0])
    if args.start_at is not None:
        rate = _one_process(args.resolution, batch, args.duration, args.start_at, args.offset)
        print(json.dumps({"pairs_per_s": rate}), flush=True)
        return
    if args.independent:
        rates = independent(args.resolution, batch, args.duration, args.independent)
        print(json.dumps(rates | {"batch": batch, "resolution": args.resolution}), flush=True)
        return
    for batch in (int(b) for b in args.batch.split(",") if b):
        rates = raw_throughput(args.resolution, batch, args.duration, args.warmup)
        print(json.dumps(rates | {"batch": batch, "resolution": args.resolution}), flush=True)


if __name__ == "__main__":
    main()
