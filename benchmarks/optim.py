"""Model-side optimisations on the raw engine, each A/B'd against its baseline in the same run.

Pre-decoded, pre-resized ImageNet pairs (``../shared/images/imagenet-sample``), batches of distinct pairs
as in ``benchmarks/raw.py``, ``lpips-alex`` in the service's engine with the service's thread settings
(``RLPIPS_CPU_STREAMS`` / ``RLPIPS_TORCH_THREADS`` as the service resolves them), reference cache off.
Variants are measured interleaved (A, B, A, B, … with the order rotated per repeat), each measurement a
``--window`` of whole batches; the table gives the median pairs/s per variant and the median of the
per-repeat ratios to the baseline, plus the largest distance change against the baseline.

* ``channels_last``: trunk weights and input in channels-last memory format vs contiguous (NCHW),
  at 64² and 256², batches of 1 and 32 pairs; and one attack-like step (float32 forward + backward to
  the input, 1 pair, NCHW input as attacks pass it) with either trunk layout;
* ``compile``: ``torch.compile`` (default mode) of the trunk vs eager, both in the engine's configured
  layout (``RLPIPS_CHANNELS_LAST``, default on): compile time of the first call
  (a cold inductor cache in a temporary folder), the same with the now-warm cache after a dynamo reset
  (a restarted process with a kept cache), a recompile for a second batch shape, and steady-state pairs/s
  at 64² and 256² with batches of 32;
* ``precision``: the engine's trunk (configured layout) in float32 vs bfloat16 vs float16 autocast (on
  the CPU float16 is very slow, hence the smaller ``--precision-batch``).

    python -m benchmarks.optim --json optim.json          # ≈ 5 min on a 2-core machine
    python -m benchmarks.optim --sections precision --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from app.config import Settings
from app.imaging import load_tensor
from app.metric.engine import Engine
from app.metric.lpips import LPIPS, Heads
from app.metric.queries import Image, Query
from app.metric.trunks import Trunk
from app.serving.runtime import cpu_threads

IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "images" / "imagenet-sample"
MODEL = "lpips-alex"
SECTIONS = ("channels_last", "compile", "precision")

Batches = list[list[Query]]


def image_batches(resolution: int, batch: int, count: int = 3) -> Batches:
    """``count`` batches of ``batch`` distinct pairs of real images at ``resolution``²."""
    files = sorted(IMAGENET.glob("*.JPEG"))[: 2 * batch * count]
    if len(files) < 2 * batch * count:
        raise SystemExit(f"need {2 * batch * count} JPEGs in {IMAGENET}")
    imgs = [Image(load_tensor(f.read_bytes(), resolution), f.name) for f in files]
    pairs = [Query(MODEL, imgs[i], (imgs[i + 1],)) for i in range(0, len(imgs), 2)]
    return [pairs[j : j + batch] for j in range(0, len(pairs), batch)]


def distances(engine: Engine, batches: Batches) -> Tensor:
    return torch.tensor(
        [d for qs in batches for a in engine.compute(qs, False) for d in a.distances]
    )


def rate(engine: Engine, batches: Batches, window_s: float) -> float:
    """Pairs/s over whole batches for at least ``window_s`` (at least one batch)."""
    pairs, k, t0 = 0, 0, time.perf_counter()
    while True:
        qs = batches[k % len(batches)]
        engine.compute(qs, use_cache=False)
        pairs, k = pairs + len(qs), k + 1
        elapsed = time.perf_counter() - t0
        if elapsed >= window_s:
            return pairs / elapsed


def ab(
    engine: Engine,
    variants: dict[str, Callable[[], None]],
    batches: Batches,
    repeats: int,
    window_s: float,
) -> dict[str, Any]:
    """Interleaved repeats of every variant (the first is the baseline); medians and ratios."""
    names = list(variants)
    rates: dict[str, list[float]] = {n: [] for n in names}
    change: dict[str, float] = {}
    variants[names[0]]()
    base = distances(engine, batches)
    for n in names:  # warm-up call of each, and its distance change vs the baseline
        variants[n]()
        change[n] = float((distances(engine, batches) - base).abs().max())
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            variants[n]()
            rates[n].append(rate(engine, batches, window_s))
    out: dict[str, Any] = {}
    for n in names:
        ratios = [a / b for a, b in zip(rates[n], rates[names[0]], strict=True)]
        out[n] = {
            "pairs_per_s": statistics.median(rates[n]),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "max_abs_change": change[n],
            "repeats": rates[n],
        }
    variants[names[0]]()
    return out


def layout(trunk: Trunk, channels_last: bool) -> Trunk:
    """A copy of ``trunk`` with its weights in channels-last or contiguous memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return copy.deepcopy(trunk).to(memory_format=fmt)


def configure(
    engine: Engine,
    trunk_id: str,
    trunk: nn.Module,
    channels_last: bool,
    dtype: torch.dtype = torch.float32,
) -> Callable[[], None]:
    """A variant: install ``trunk``, the input layout and the autocast dtype in ``engine``."""

    def apply() -> None:
        engine.trunks[trunk_id] = cast(Trunk, trunk)
        engine.channels_last = channels_last
        engine.precision = dtype

    return apply


def attack_steps(trunk: Trunk, heads: Heads, res: int, repeats: int) -> dict[str, Any]:
    """Median seconds of one attack-like step on one pair: float32 forward + backward to the input as
    ``Engine.metric`` runs it (input contiguous NCHW), trunk weights contiguous vs channels-last."""
    query = image_batches(res, 1, 1)[0][0]
    x0, x1 = query.reference.tensor[None], query.candidates[0].tensor[None]
    metrics = {"contiguous": LPIPS(layout(trunk, False), heads)}
    metrics["channels_last"] = LPIPS(layout(trunk, True), heads)
    times: dict[str, list[float]] = {n: [] for n in metrics}
    for r in range(repeats + 1):
        for n, m in metrics.items():
            x = x0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            torch.autograd.grad(m(x, x1).sum(), x)
            if r:  # round 0 warms up
                times[n].append(time.perf_counter() - t0)
    base = statistics.median(times["contiguous"])
    return {
        n: {"step_s": statistics.median(t), "speed_ratio": base / statistics.median(t)}
        for n, t in times.items()
    }


def section_channels_last(
    engine: Engine, tid: str, args: argparse.Namespace
) -> Iterator[dict[str, Any]]:
    trunk, configured = engine.trunks[tid], engine.channels_last
    variants = {
        "contiguous": configure(engine, tid, layout(trunk, False), False),
        "channels_last": configure(engine, tid, layout(trunk, True), True),
    }
    for res in (64, 256):
        for batch in (1, 32):
            batches = image_batches(res, batch)
            yield {
                "section": "channels_last",
                "resolution": res,
                "batch": batch,
                "variants": ab(engine, variants, batches, args.repeats, args.window),
            }
    configure(engine, tid, trunk, configured)()
    for res in (64, 256):
        yield {
            "section": "channels_last",
            "resolution": res,
            "batch": 1,
            "attack_step": attack_steps(trunk, engine.heads[MODEL], res, args.repeats),
        }


def chunk_shape(engine: Engine, batch: int, res: int) -> tuple[int, int, int, int]:
    """The shape each stream's trunk call sees for ``batch`` distinct pairs."""
    n = 2 * batch
    return (-(-n // max(1, min(engine.streams, n))), 3, res, res)


def timed_first_call(trunk: nn.Module, shape: tuple[int, int, int, int], cl: bool) -> float:
    x = torch.rand(shape) * 2 - 1
    x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    t0 = time.perf_counter()
    with torch.inference_mode():
        trunk(x)
    return time.perf_counter() - t0


def compile_copy(trunk: Trunk) -> nn.Module:
    """``torch.compile`` (default mode) of a copy of ``trunk``."""
    return cast(nn.Module, torch.compile(copy.deepcopy(trunk)))


def section_compile(engine: Engine, tid: str, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Compile in this thread first (the shape of one stream chunk), then A/B through the engine
    against the engine's trunk as configured (``RLPIPS_CHANNELS_LAST``, default on)."""
    eager, cl = engine.trunks[tid], engine.channels_last
    batch = 32
    for res in (64, 256):
        torch._dynamo.reset()
        shape = chunk_shape(engine, batch, res)
        row: dict[str, Any] = {"section": "compile", "resolution": res, "batch": batch}
        row["channels_last"] = cl
        row["eager_first_call_s"] = timed_first_call(copy.deepcopy(eager), shape, cl)
        try:
            compiled = compile_copy(eager)
            row["compile_cold_s"] = timed_first_call(compiled, shape, cl)
            torch._dynamo.reset()
            compiled = compile_copy(eager)
            row["compile_warm_cache_s"] = timed_first_call(compiled, shape, cl)
            variants = {
                "eager": configure(engine, tid, eager, cl),
                "compiled": configure(engine, tid, compiled, cl),
            }
            batches = image_batches(res, batch)
            row["variants"] = ab(engine, variants, batches, args.repeats, args.window)
            # a service sees many batch sizes: the next shape recompiles (dynamo then makes the batch
            # dimension dynamic), and later calls may run that dynamic-shape graph
            row["second_shape_recompile_s"] = timed_first_call(compiled, (3, 3, res, res), cl)
            variants["compiled_after_2nd_shape"] = variants.pop("compiled")
            after = ab(engine, variants, batches, args.repeats, args.window)
            row["variants"]["compiled_after_2nd_shape"] = after["compiled_after_2nd_shape"]
        except Exception as exc:  # e.g. no C++ compiler: report it, keep the other sections
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        configure(engine, tid, eager, cl)()
        yield row


def section_precision(
    engine: Engine, tid: str, args: argparse.Namespace
) -> Iterator[dict[str, Any]]:
    trunk, cl = engine.trunks[tid], engine.channels_last
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    variants = {n: configure(engine, tid, trunk, cl, dtype) for n, dtype in dtypes.items()}
    for res in (64, 256):
        batches = image_batches(res, args.precision_batch)
        yield {
            "section": "precision",
            "resolution": res,
            "batch": args.precision_batch,
            "channels_last": cl,
            "variants": ab(engine, variants, batches, args.repeats, args.window),
        }


def print_row(row: dict[str, Any]) -> None:
    head = f"{row['section']:<13} {row['resolution']:>4}² batch {row['batch']:>2}"
    if "compile_cold_s" in row:
        print(
            f"{head}  compile: cold {row['compile_cold_s']:.1f} s, warm cache "
            f"{row['compile_warm_cache_s']:.1f} s, new shape {row['second_shape_recompile_s']:.1f} s "
            f"(eager first call {row['eager_first_call_s']:.2f} s)"
        )
    if "error" in row:
        print(f"{head}  FAILED: {row['error']}")
    for name, v in row.get("attack_step", {}).items():
        step, speed = 1000 * v["step_s"], v["speed_ratio"]
        print(f"{head}  attack step, {name:<14} {step:7.1f} ms  ×{speed:.3f} speed")
    for name, v in row.get("variants", {}).items():
        print(
            f"{head}  {name:<14} {v['pairs_per_s']:8.1f} pairs/s  ×{v['ratio']:.3f} "
            f"({v['ratio_min']:.2f}–{v['ratio_max']:.2f})  max |Δd| {v['max_abs_change']:.1e}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats per variant")
    p.add_argument(
        "--window", type=float, default=1.0, help="seconds per measurement (whole batches)"
    )
    p.add_argument(
        "--precision-batch", type=int, default=8, help="pairs per batch, precision section"
    )
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument(
        "--keep-inductor-cache", action="store_true", help="do not isolate the compile cache"
    )
    args = p.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    if unknown := set(sections) - set(SECTIONS):
        p.error(f"unknown sections {sorted(unknown)}")
    if not args.keep_inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlpips-inductor-")
    settings = Settings()
    streams, threads = cpu_threads(settings, torch.device("cpu"))
    if threads:
        torch.set_num_threads(threads)
    engine = Engine(
        settings.store(),
        [MODEL],
        torch.device("cpu"),
        64,
        streams=streams,
        channels_last=settings.channels_last,
    )
    engine.load()
    tid = engine.trunk_of[MODEL]
    run: dict[str, Any] = {
        "load_start": os.getloadavg(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "streams": streams,
        "intra_op_threads": torch.get_num_threads(),
        "channels_last": settings.channels_last,
        "repeats": args.repeats,
        "window_s": args.window,
        "rows": [],
    }
    print(
        f"load average at start {run['load_start']}; {streams} streams × {run['intra_op_threads']} threads"
    )
    t0 = time.perf_counter()
    funcs = {
        "channels_last": section_channels_last,
        "compile": section_compile,
        "precision": section_precision,
    }
    for name in sections:
        for row in funcs[name](engine, tid, args):
            print_row(row)
            run["rows"].append(row)
    run["load_end"] = os.getloadavg()
    run["wall_s"] = time.perf_counter() - t0
    print(f"load average at end {run['load_end']}; {run['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(run, indent=1) + "\n")


if __name__ == "__main__":
    main()
