"""Collect the candidates' evaluation reports into candidates.json and plot the trade-off.

Usage (from the repository root):
    python docs/training/candidates.py REPORT.json [REPORT.json ...] [--val VAL.json ...]
REPORT.json: ``rlpips evaluate apgd|neardup|agreement|card`` outputs (merged by model name; later wins);
VAL.json: ``rlpips finetune-threshold --json`` outputs (the val FMR-1e-5 thresholds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent


def short(name: str) -> str:
    base = name.split("@")[0]
    return Path(base).parent.name if base.endswith(".safetensors") else base


def collect(reports: list[Path], vals: list[Path]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for path in reports:
        for name, m in json.loads(path.read_text())["models"].items():
            if name == "pdq":
                continue
            row = out.setdefault(short(name), {})
            if "2afc" in m:
                row["clean_2afc"] = m["2afc"]["clean"]
                for a in m["2afc"]["attacks"]:
                    row[a["label"]] = a["accuracy"]
            if "neardup" in m:
                nd = m["neardup"]
                row["threshold_used"] = nd["threshold"]
                row["fmr_at_threshold"] = nd["fmr"]
                row["threshold_fmr_1e-5_eval"] = nd["threshold_fmr_1e-5"]
                for e in ("crop-20pct", "rotate-5deg", "translate-3pct", "hflip"):
                    row[f"{e}@fmr1e-5"] = nd["detection_fmr_1e-5"][e]
                    row[f"{e}@threshold"] = nd["detection"][e]
            if "agreement" in m:
                ag = m["agreement"]
                row["spearman_lpips_alex"] = ag["spearman"]["lpips-alex"]
                shares = ag["layer_shares"]
                row["max_layer_share"] = max(shares) if shares else None
            if "evasion" in m:
                row["evasion"] = m["evasion"]["rate"]
                row["impersonation"] = m["impersonation"]["rate"]
    for path in vals:
        rep = json.loads(path.read_text())
        for name, v in rep.items():
            if isinstance(v, dict) and "threshold" in v:
                row = out.setdefault(short(name), {})
                row["val_threshold"] = v["threshold"]
                for e, d in v["detection"].items():
                    row[f"val_{e}"] = d
    return out


def plot(rows: dict[str, dict[str, float | None]], png: Path) -> None:
    x_key = "APGD-100x1 linf 8/255 on right"
    panels = [
        ("crop-20pct@fmr1e-5", "crop-20 % detected at FMR 1e-5 (eval)"),
        ("spearman_lpips_alex", "Spearman with LPIPS-alex"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, r in rows.items():
            x, y = r.get(x_key), r.get(key)
            if x is None or y is None:
                continue
            ax.scatter([x], [y], s=40, color="C0" if name.startswith("ft-") else "C3")
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("2AFC accuracy, APGD-100 L-inf 8/255 on the closer candidate")
        ax.set_ylabel(label)
        ax.axvline(0.5, ls=":", color="grey")
        ax.axhline(0.90, ls=":", color="grey")
        ax.grid(alpha=0.3)
    fig.suptitle("Candidates (blue) vs shipped models (red); dotted: targets")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--val", nargs="*", type=Path, default=[])
    p.add_argument("--out", type=Path, default=HERE / "candidates.json")
    a = p.parse_args()
    rows = collect(a.reports, a.val)
    a.out.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    plot(rows, a.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
