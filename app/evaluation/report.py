"""Render a suite report (``rlpips evaluate card``'s JSON) as markdown tables and matplotlib plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _f(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and 0 < abs(v) < 10 ** (-nd):
        return f"{v:.1e}"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs of parts of the suite: models' sections merged (later wins),
    each run's ``meta`` kept under ``meta["runs"]`` and the shared descriptions merged."""
    if len(reports) == 1:
        return reports[0]
    out: dict[str, Any] = {"meta": {"runs": [r["meta"] for r in reports]}, "models": {}}
    for r in reports:
        for k in ("triplets", "negatives", "agreement_pairs", "eval_images"):
            if k in r["meta"]:
                out["meta"][k] = r["meta"][k]
        for name, m in r["models"].items():
            have = out["models"].setdefault(name, {})
            old = have.get("2afc")
            have.update(m)
            if old is not None and "2afc" in m:  # keep every attack; a repeated label: later wins
                new = {a["label"]: a for a in m["2afc"]["attacks"]}
                kept = [a for a in old["attacks"] if a["label"] not in new]
                have["2afc"] = {**old, "attacks": kept + m["2afc"]["attacks"]}
    return out


def attack_labels(report: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for m in report["models"].values():
        for a in m.get("2afc", {}).get("attacks", []):
            if a["label"] not in seen:
                seen.append(a["label"])
    return seen


def markdown(report: dict[str, Any]) -> str:
    """The report's tables: 2AFC, near-duplicates per edit, false matches, attacks, agreement."""
    models = report["models"]
    out: list[str] = []
    labels = attack_labels(report)
    if labels:
        t = report["meta"].get("triplets", {})
        out += [
            f"### 2AFC accuracy (objective labels, {t.get('n')} triplets, {t.get('patch')}×{t.get('patch')})",
            "",
        ]
        rows = []
        for name, m in models.items():
            if "2afc" not in m:
                continue
            acc = {a["label"]: a["accuracy"] for a in m["2afc"]["attacks"]}
            rows.append([f"`{name}`", _f(m["2afc"]["clean"]), *(_f(acc.get(lb)) for lb in labels)])
        out += [*_table(["model", "clean", *labels], rows), ""]
    nd = {n: m["neardup"] for n, m in models.items() if "neardup" in m}
    if nd:
        first = next(iter(nd.values()))
        edits = list(first["detection"])
        out += [
            "### Near-copies detected at the model's threshold (share of positives with d ≤ threshold)",
            "",
        ]
        rows = [
            [f"`{n}`", _f(r["threshold"], 4), *(_f(r["detection"][e], 2) for e in edits)]
            for n, r in nd.items()
        ]
        out += [*_table(["model", "threshold", *edits], rows), ""]
        out += ["### False matches among unrelated pairs, ROC", ""]
        rows = [
            [f"`{n}`", f"{r['false_matches']} / {r['n_negatives']}", _f(r["fmr"], 6), _f(r["auc"], 5),
             _f(r["threshold_fmr_1e-5"], 4), _f(r["detection_all"]),
             _f(sum(r["detection_fmr_1e-5"].values()) / len(r["detection_fmr_1e-5"]))]
            for n, r in nd.items()
        ]  # fmt: skip
        out += _table(["model", "false matches", "FMR at threshold", "AUC", "threshold at FMR 1e-5",
                       "detected (all edits) at threshold", "detected (mean over edits) at FMR 1e-5"], rows)  # fmt: skip
        out += ["", "Detection at the FMR-1e-5 threshold, per edit:", ""]
        rows = [
            [f"`{n}`", *(_f(r["detection_fmr_1e-5"][e], 2) for e in edits)] for n, r in nd.items()
        ]
        out += [*_table(["model", *edits], rows), ""]
    mirrored = {n: m["neardup_mirror"] for n, m in models.items() if "neardup_mirror" in m}
    if mirrored:
        edits = list(next(iter(mirrored.values()))["detection"])
        out += ["### With the mirror invariance on (`invariance: [\"hflip\"]`: the minimum over the "
                "candidate and its mirror, negatives too)", ""]  # fmt: skip
        rows = [
            [f"`{n}`", _f(r["threshold"], 4), f"{r['false_matches']} / {r['n_negatives']}",
             *(_f(r["detection"][e], 2) for e in edits)]
            for n, r in mirrored.items()
        ]  # fmt: skip
        out += [*_table(["model", "threshold", "false matches", *edits], rows), ""]
    att = {n: m for n, m in models.items() if "evasion" in m}
    if att:
        out += ["### Evasion and impersonation at the model's threshold", ""]
        rows = []
        for n, m in att.items():
            ev, im = m["evasion"], m["impersonation"]
            how = (
                f"APGD-{ev['steps']}x{ev['restarts']}"
                if ev["method"] == "apgd"
                else f"Square-{ev['queries']}q"
            )
            eps = f"{ev['epsilon'] * 255:g}/255"
            rows.append([f"`{n}`", f"{how} L∞ {eps} on the candidate",
                         f"{_f(ev['rate'])} ({ev['succeeded']}/{ev['eligible']})",
                         f"{_f(im['rate'])} ({im['succeeded']}/{im['eligible']})"])  # fmt: skip
        out += _table(
            ["model", "attack", "evasion of detected copies", "impersonation of unrelated pairs"],
            rows,
        )
        out += [""]
    ag = {n: m["agreement"] for n, m in models.items() if "agreement" in m}
    if ag:
        out += [f"### Rank agreement (Spearman, {report['meta'].get('agreement_pairs')} clean distortion pairs) "
                "and layer shares", ""]  # fmt: skip
        rows = []
        for n, a in ag.items():
            sh = a["layer_shares"]
            shares = " / ".join(f"{v:.2f}" for v in sh) if sh else "n/a"
            sp = a["spearman"]
            rows.append([f"`{n}`", _f(sp.get("lpips-alex")), _f(sp["pixel_l2"]), _f(sp["1-ssim"]), shares,
                         _f(max(sh), 2) if sh else "n/a"])  # fmt: skip
        out += _table(
            [
                "model",
                "ρ LPIPS-alex",
                "ρ pixel L2",
                "ρ 1−SSIM",
                "layer shares (conv1..5)",
                "largest",
            ],
            rows,
        )
    return "\n".join(out) + "\n"


def plots(report: dict[str, Any], prefix: Path) -> list[Path]:
    """``PREFIX-roc.png`` (detection vs FMR), ``PREFIX-edits.png`` (per-edit detection at the threshold)
    and ``PREFIX-2afc.png`` (accuracy per attack); only for the parts present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    written: list[Path] = []
    nd = {n: m["neardup"] for n, m in models.items() if "neardup" in m}
    if nd:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for n, r in nd.items():
            roc = r["roc"]
            ax.plot(
                [max(f, 1e-7) for f in roc["fmr"]], roc["tpr"], label=f"{n} (AUC {r['auc']:.4f})"
            )
            ax.scatter([max(r["fmr"], 1e-7)], [r["detection_all"]], marker="o")
        ax.axvline(1e-5, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("false-match rate (unrelated pairs; 1e-7 = none)")
        ax.set_ylabel("near-copies detected (all edits)")
        ax.legend(fontsize=7)
        ax.set_title("near-duplicate ROC (dot: the model's threshold)")
        fig.tight_layout()
        written.append(prefix.with_name(prefix.name + "-roc.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
        edits = list(next(iter(nd.values()))["detection"])
        fig, ax = plt.subplots(figsize=(10, 4))
        w = 0.8 / len(nd)
        for k, (n, r) in enumerate(nd.items()):
            ax.bar(
                [i + k * w for i in range(len(edits))],
                [r["detection"][e] for e in edits],
                w,
                label=n,
            )
        ax.set_xticks(
            [i + 0.4 - w / 2 for i in range(len(edits))], edits, rotation=45, ha="right", fontsize=8
        )
        ax.set_ylabel("detected at the model's threshold")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(prefix.with_name(prefix.name + "-edits.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    labels = attack_labels(report)
    if labels:
        fig, ax = plt.subplots(figsize=(10, 4))
        names = [n for n, m in models.items() if "2afc" in m]
        w = 0.8 / max(1, len(names))
        cols = ["clean", *labels]
        for k, n in enumerate(names):
            acc = {a["label"]: a["accuracy"] for a in models[n]["2afc"]["attacks"]}
            vals = [models[n]["2afc"]["clean"], *(acc.get(lb, float("nan")) for lb in labels)]
            ax.bar([i + k * w for i in range(len(cols))], vals, w, label=n)
        ax.set_xticks(
            [i + 0.4 - w / 2 for i in range(len(cols))], cols, rotation=30, ha="right", fontsize=8
        )
        ax.set_ylabel("2AFC accuracy")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(prefix.with_name(prefix.name + "-2afc.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
