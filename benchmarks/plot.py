"""Throughput vs concurrency from ``benchmarks.run`` JSON files: one panel per resolution, one line per
target (median pairs/s, bars from the slowest to the fastest repeat), the raw batched model as a
horizontal line.

    python -m benchmarks.plot docs/benchmarks/a.json docs/benchmarks/b.json --out docs/benchmarks/throughput.png
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"service": "C0", "naive": "C1", "litserve": "C2", "raw": "C3", "cached": "C4"}


def _load(paths: list[Path]) -> dict[int, list[tuple[str, dict[str, Any]]]]:
    """Resolution → ``(file stem, summary)`` of every file at that resolution."""
    by_res: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for path in paths:
        doc = json.loads(path.read_text())
        if "levels" not in doc.get("summary", {}):
            raise SystemExit(f"{path}: not a benchmarks.run JSON with concurrency levels")
        by_res[int(doc["args"]["resolution"])].append((path.stem, doc["summary"]))
    return dict(sorted(by_res.items()))


def _line(
    ax: Any, target: str, block: dict[str, Any], xs: list[int], label: str, color: Any
) -> None:
    if target == "raw":
        ax.axhline(block["pairs_per_s"], color=color, linestyle="--", label=label)
        return
    ys = [block[str(c)]["pairs_per_s"] for c in xs]
    per = [block[str(c)]["pairs_per_s_per_repeat"] for c in xs]
    err = [[y - min(p) for y, p in zip(ys, per, strict=True)]]
    err += [[max(p) - y for y, p in zip(ys, per, strict=True)]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=color, label=label)


def _panel(ax: Any, resolution: int, runs: list[tuple[str, dict[str, Any]]]) -> None:
    """A target that appears in several files gets the file name in its label and its own colour."""
    seen = Counter(t for _, summary in runs for t in summary["targets"])
    levels = sorted({c for _, summary in runs for c in summary["levels"]})
    spare = iter(f"C{i}" for i in range(5, 1000))  # colours no single-file target uses
    for stem, summary in runs:
        for target, block in summary["targets"].items():
            label = f"raw, batch {block['batch']}" if target == "raw" else target
            color = COLORS.get(target) if seen[target] == 1 else next(spare)
            label += f" ({stem})" if seen[target] > 1 else ""
            _line(ax, target, block, list(summary["levels"]), label, color)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_ylim(bottom=0)
    ax.set_title(f"{resolution}×{resolution}")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("pairs/s (median of repeats)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot(paths: list[Path], out: Path) -> None:
    """Write the PNG ``out`` from the run JSON files ``paths``."""
    by_res = _load(paths)
    fig, axes = plt.subplots(1, len(by_res), figsize=(6 * len(by_res), 4.5), squeeze=False)
    for ax, (resolution, runs) in zip(axes[0], by_res.items(), strict=True):
        _panel(ax, resolution, runs)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("json", nargs="+", type=Path, help="benchmarks.run --json outputs")
    p.add_argument("--out", type=Path, default=Path("throughput.png"))
    args = p.parse_args()
    plot(args.json, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
