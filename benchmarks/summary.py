"""The summary of one ``benchmarks.run`` session: medians over repeats, ratios taken within each repeat.

``runs`` maps a target to one entry per repeat. A server target's entry is
``{"startup_s": s, "levels": {"<concurrency>": loadgen result + cpu_ms_per_pair (+ diagnostics)}}``;
the raw target's is ``{"batch": raw.py line at the max batch, "single": raw.py line at batch 1}``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

#: (numerator, denominator) of every ratio reported when both targets ran; pairs/s, same repeat.
RATIOS = (("service", "raw"), ("service", "naive"), ("service", "litserve"), ("cached", "service"))
LEVEL_KEYS = (
    "pairs_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "cpu_ms_per_pair",
    "client_cpu_ms_per_pair",
)
#: issue 7: p50 at concurrency 1 at most the single-pair inference time plus this many ms.
P50_C1_BUDGET_MS = 5.0

Run = dict[str, Any]


def _med(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    per = [n / d if d else float("nan") for n, d in zip(num, den, strict=True)]
    return {"per_repeat": per, "median": _med(per)}


def _level(results: list[Run]) -> dict[str, Any]:
    """Medians over repeats of one target at one concurrency."""
    out: dict[str, Any] = {k: _med([r[k] for r in results]) for k in LEVEL_KEYS}
    out["pairs_per_s_per_repeat"] = [r["pairs_per_s"] for r in results]
    out["errors"] = sum(r["errors"] for r in results)
    diags = [r["diagnostics"] for r in results if "diagnostics" in r]
    if diags:
        out["diagnostics"] = {k: _med([d[k] for d in diags]) for k in diags[0]}
    return out


def _raw(reps: list[Run]) -> dict[str, Any]:
    single = [r["single"]["batch_ms"] for r in reps]
    return {
        "batch": reps[0]["batch"]["batch"],
        "pairs_per_s": _med([r["batch"]["pairs_per_s"] for r in reps]),
        "pairs_per_s_per_repeat": [r["batch"]["pairs_per_s"] for r in reps],
        "cpu_ms_per_pair": _med([r["batch"]["cpu_ms_per_pair"] for r in reps]),
        "single_pair_ms": _med(single),
        "single_pair_ms_per_repeat": single,
        "single_pairs_per_s": _med([r["single"]["pairs_per_s"] for r in reps]),
    }


def _throughput(reps: list[Run], target: str, level: int) -> list[float]:
    if target == "raw":
        return [r["batch"]["pairs_per_s"] for r in reps]
    return [r["levels"][str(level)]["pairs_per_s"] for r in reps]


def summarize(runs: dict[str, list[Run]], levels: Sequence[int]) -> dict[str, Any]:
    """Per target (and concurrency) medians, the ratios of :data:`RATIOS` per concurrency (median of
    the per-repeat ratios) and issue 7's concurrency-1 latency check when service and raw ran."""
    out: dict[str, Any] = {"levels": list(levels), "targets": {}, "ratios": {}, "checks": {}}
    for target, reps in runs.items():
        if not reps:
            continue
        if target == "raw":
            out["targets"][target] = _raw(reps)
            continue
        block: dict[str, Any] = {
            str(c): _level([r["levels"][str(c)] for r in reps]) for c in levels
        }
        block["startup_s"] = _med([r["startup_s"] for r in reps])
        out["targets"][target] = block
    for num, den in RATIOS:
        if runs.get(num) and runs.get(den):
            out["ratios"][f"{num}/{den}"] = {
                str(c): _ratio(_throughput(runs[num], num, c), _throughput(runs[den], den, c))
                for c in levels
            }
    if 1 in levels and runs.get("service") and runs.get("raw"):
        gaps = [
            s["levels"]["1"]["p50_ms"] - r["single"]["batch_ms"]
            for s, r in zip(runs["service"], runs["raw"], strict=True)
        ]
        out["checks"]["p50_c1_minus_single_pair_ms"] = {
            "per_repeat": gaps,
            "median": _med(gaps),
            "budget_ms": P50_C1_BUDGET_MS,
            "met": _med(gaps) <= P50_C1_BUDGET_MS,
        }
    return out


def _row(target: str, s: dict[str, Any]) -> str:
    per = ", ".join(f"{v:.1f}" for v in s["pairs_per_s_per_repeat"])
    lat = " / ".join(f"{s[k]:.0f}" for k in ("p50_ms", "p95_ms", "p99_ms"))
    return (
        f"| {target} | {s['pairs_per_s']:.1f} ({per}) | {lat} | {s['cpu_ms_per_pair']:.1f} "
        f"| {s['errors']} |"
    )


def table(summary: dict[str, Any], repeats: int) -> str:
    """Markdown: one table per concurrency level, then the ratios and checks."""
    targets, lines = summary["targets"], []
    raw = targets.get("raw")
    for c in summary["levels"]:
        lines += [
            f"\n### concurrency {c}\n",
            f"| target | pairs/s, median of {repeats} (per repeat) | p50 / p95 / p99 ms "
            "| CPU ms/pair | errors |",
            "|---|---|---|---|---|",
        ]
        lines += [_row(t, s[str(c)]) for t, s in targets.items() if t != "raw"]
        if raw:
            per = ", ".join(f"{v:.1f}" for v in raw["pairs_per_s_per_repeat"])
            lines.append(
                f"| raw (batch {raw['batch']}) | {raw['pairs_per_s']:.1f} ({per}) | — "
                f"| {raw['cpu_ms_per_pair']:.1f} | — |"
            )
        for t in ("service", "cached"):
            diag = targets.get(t, {}).get(str(c), {}).get("diagnostics")
            if diag:
                lines.append(
                    f"\n{t} /metrics: " + ", ".join(f"{k} {v:.2f}" for k, v in diag.items())
                )
    if raw:
        per = ", ".join(f"{v:.2f}" for v in raw["single_pair_ms_per_repeat"])
        lines.append(
            f"\nraw single-pair inference (batch 1): {raw['single_pair_ms']:.2f} ms ({per})"
        )
    for name, by_level in summary["ratios"].items():
        for c, r in by_level.items():
            per = ", ".join(f"{v:.2f}" for v in r["per_repeat"])
            lines.append(f"{name} at c={c}: median {r['median']:.2f} (per repeat: {per})")
    check = summary["checks"].get("p50_c1_minus_single_pair_ms")
    if check:
        verdict = "met" if check["met"] else "not met"
        lines.append(
            f"service p50 at c=1 minus single-pair inference: median {check['median']:.2f} ms "
            f"(budget {check['budget_ms']:.0f} ms: {verdict})"
        )
    return "\n".join(lines)
