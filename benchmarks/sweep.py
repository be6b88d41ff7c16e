"""Choose a service setting by measurement: the service under several values of one or more settings.

Every variant (one value per ``--vary``) is started in turn, in an order rotated per repeat, and loaded with
the same harness, payloads and concurrency levels as ``benchmarks.run``; pairs/s and latency are reported
per variant and level as medians over repeats, with each variant's pairs/s as a ratio to the first
variant's **within the same repeat** (then the median).

    python -m benchmarks.sweep --resolution 64 --vary RLPIPS_MAX_WAIT_MS=0,2,5 --concurrency 1,8,32
    python -m benchmarks.sweep --resolution 256 --vary RLPIPS_MAX_BATCH_PAIRS=8,16,32,64 --concurrency 32

Options not listed here are those of ``benchmarks.run`` (``--duration``, ``--warmup``, ``--repeats``,
``--service-env``, ``--json``, ...).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import statistics
import sys
from typing import Any

from benchmarks.loadgen import IMAGENET, pair_bodies
from benchmarks.run import _machine, _parse, _serve_and_load


def variants(vary: list[str]) -> list[dict[str, str]]:
    """``["A=1,2", "B=x"]`` → ``[{"A": "1", "B": "x"}, {"A": "2", "B": "x"}]`` (every combination)."""
    axes = []
    for item in vary:
        key, _, values = item.partition("=")
        if not key or not values:
            raise SystemExit(f"--vary needs NAME=V1,V2,...; got {item!r}")
        axes.append([(key, v) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def label(variant: dict[str, str]) -> str:
    return ",".join(f"{k.removeprefix('RLPIPS_').lower()}={v}" for k, v in variant.items())


def summarize(runs: dict[str, list[dict[str, Any]]], levels: list[int]) -> dict[str, Any]:
    """Per variant and level: median pairs/s, p50/p95/p99, ratio to the first variant (per repeat)."""
    names = list(runs)
    out: dict[str, Any] = {}
    for name in names:
        per_level = {}
        for c in map(str, levels):
            reps = [r["levels"][c] for r in runs[name]]
            base = [r["levels"][c]["pairs_per_s"] for r in runs[names[0]]]
            ratios = [r["pairs_per_s"] / b for r, b in zip(reps, base, strict=True) if b > 0]
            per_level[c] = {
                "pairs_per_s": statistics.median(r["pairs_per_s"] for r in reps),
                **{q: statistics.median(r[f"{q}_ms"] for r in reps) for q in ("p50", "p95", "p99")},
                "ratio_to_first": statistics.median(ratios) if ratios else float("nan"),
                "errors": sum(r["errors"] for r in reps),
                "mean_batch_pairs": statistics.median(
                    r.get("diagnostics", {}).get("mean_batch_pairs", float("nan")) for r in reps
                ),
            }
        out[name] = per_level
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    vary = [argv[i + 1] for i, a in enumerate(argv) if a == "--vary"]
    rest = [a for i, a in enumerate(argv) if a != "--vary" and (i == 0 or argv[i - 1] != "--vary")]
    args = _parse(rest)
    combos = variants(vary)
    bodies = pair_bodies(IMAGENET, args.pairs)
    machine = _machine()
    runs: dict[str, list[dict[str, Any]]] = {label(v): [] for v in combos}
    for rep in range(args.repeats):
        order = combos[rep % len(combos) :] + combos[: rep % len(combos)]
        for variant in order:
            print(f"repeat {rep + 1}/{args.repeats}: {label(variant)}", file=sys.stderr, flush=True)
            a = copy.copy(args)
            a.service_env = [*args.service_env, *(f"{k}={v}" for k, v in variant.items())]
            runs[label(variant)].append(_serve_and_load("service", a, bodies))
    machine["loadavg_end"] = os.getloadavg()
    summary = summarize(runs, args.levels)
    for name, per_level in summary.items():
        for c, row in per_level.items():
            print(
                f"{name:40s} c={c:>3}: {row['pairs_per_s']:8.1f} pairs/s "
                f"(x{row['ratio_to_first']:.2f}), p50/p95/p99 {row['p50']:.0f}/{row['p95']:.0f}/"
                f"{row['p99']:.0f} ms, batch {row['mean_batch_pairs']:.1f}, errors {row['errors']}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "argv": [sys.executable, "-m", "benchmarks.sweep", *argv],
            "machine": machine,
            "runs": runs,
            "summary": summary,
        }
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
