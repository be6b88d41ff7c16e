"""``rlpips evaluate card | apgd | neardup | agreement | card-table``: issue 13's evaluation suite
(APGD / Square with the margin loss on 2AFC, near-duplicate ROC with false-match rates, evasion and
impersonation, rank agreement and layer shares; LPIPS models and PDQ side by side)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from app.cli.args import fraction
from app.config import Settings
from app.evaluation import report as render
from app.evaluation.data import EDITS
from app.evaluation.scorers import PDQ
from app.evaluation.suite import PARTS, SuiteConfig, default_attacks, run_suite
from app.evaluation.twoafc import AttackSpec
from app.metric.store import BASELINE_MODEL

DEFAULT_MODELS = ["r-lpips-alex-linf-synth", BASELINE_MODEL, PDQ]


def attack_arg(value: str) -> AttackSpec:
    """``METHOD,NORM,EPS,TARGET[,STEPS_OR_QUERIES[,RESTARTS]]``, e.g. ``apgd,linf,8/255,right,100,3``."""
    parts = value.split(",")
    try:
        method, norm, eps, target = parts[:4]
        n = int(parts[4]) if len(parts) > 4 else (100 if method == "apgd" else 1000)
        restarts = int(parts[5]) if len(parts) > 5 else 1
        if method not in ("apgd", "square") or norm not in ("linf", "l2"):
            raise ValueError(value)
        if target not in ("ref", "right", "wrong"):
            raise ValueError(value)
        kw = {"steps": n} if method == "apgd" else {"queries": n}
        return AttackSpec(method, norm, fraction(eps), target, restarts=restarts, **kw)  # type: ignore[arg-type]
    except (ValueError, IndexError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected METHOD,NORM,EPS,TARGET[,STEPS_OR_QUERIES[,RESTARTS]], got {value!r}"
        ) from None


def _attacks(args: argparse.Namespace) -> list[AttackSpec]:
    if args.attack:
        return [AttackSpec(s.method, s.norm, s.epsilon, s.target, s.steps, s.restarts, s.queries,
                           args.seed) for s in args.attack]  # fmt: skip
    specs = default_attacks(args.steps, args.restarts, args.queries, args.other_steps)
    if args.only_attack:
        specs = [s for s in specs if s.label().split(" on ")[0].endswith(tuple(args.only_attack))
                 or any(o in s.label() for o in args.only_attack)]  # fmt: skip
    return [AttackSpec(s.method, s.norm, s.epsilon, s.target, s.steps, s.restarts, s.queries, args.seed)
            for s in specs]  # fmt: skip


def _run(args: argparse.Namespace, settings: Settings, parts: tuple[str, ...]) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SuiteConfig(
        models=args.models, parts=parts, triplets=args.triplets, attacks=_attacks(args),
        resolution=args.resolution, images=args.images, edits=args.edits,
        negative_views=args.negative_views, mirror=not args.no_mirror, attack_pairs=args.attack_pairs,
        attack_steps=args.attack_steps, attack_queries=args.attack_queries,
        attack_epsilon=args.attack_epsilon, seed=args.seed,
    )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(report: dict[str, Any]) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out)

    report = run_suite(cfg, settings.store(), "rlpips " + shlex.join(sys.argv[1:]), checkpoint=save)
    save(report)
    table = render.markdown(report)
    out.with_suffix(".md").write_text(table)
    written = [] if args.no_plots else render.plots(report, out.with_suffix(""))
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}" + "".join(f", {p}" for p in written))
    return 0


def cmd_card(args: argparse.Namespace, settings: Settings) -> int:
    return _run(args, settings, tuple(args.parts))


def cmd_table(args: argparse.Namespace, settings: Settings) -> int:
    reports = [json.loads(Path(p).read_text()) for p in args.json]
    report = render.merge(reports)
    table = render.markdown(report)
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)
        render.plots(report, out.with_suffix(""))
    print(table, end="")
    return 0


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                   help="store names, bundle paths (NAME@THRESHOLD) or 'pdq'")  # fmt: skip
    p.add_argument(
        "--out", default=out, help="JSON path (the .md table and -*.png plots beside it)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    g = p.add_argument_group("2AFC attacks")
    g.add_argument("--triplets", type=int, default=200, help="objective 2AFC triplets (64x64)")
    g.add_argument("--steps", type=int, default=100, help="APGD iterations")
    g.add_argument(
        "--restarts", type=int, default=3, help="APGD restarts at L-inf 4/255 on the reference"
    )
    g.add_argument(
        "--other-steps", type=int, help="APGD iterations of the other attacks (default --steps)"
    )
    g.add_argument("--queries", type=int, default=1000, help="Square query budget")
    g.add_argument("--attack", type=attack_arg, action="append",
                   help="replace the default set: METHOD,NORM,EPS,TARGET[,STEPS_OR_QUERIES[,RESTARTS]]")  # fmt: skip
    g.add_argument(
        "--only-attack", nargs="*", help="keep attacks whose label contains any of these"
    )
    g = p.add_argument_group("near-duplicates")
    g.add_argument("--resolution", type=int, default=256)
    g.add_argument("--images", type=int, help="first N evaluation images (default: all 124)")
    g.add_argument("--edits", nargs="+", default=list(EDITS), choices=list(EDITS))
    g.add_argument("--negative-views", type=int, default=4, help="crop views per image (1..5)")
    g.add_argument("--no-mirror", action="store_true",
                   help="skip the near-duplicate ROC with the mirror invariance on")  # fmt: skip
    g.add_argument("--attack-pairs", type=int, default=32, help="pairs for evasion / impersonation")
    g.add_argument("--attack-steps", type=int, default=50)
    g.add_argument("--attack-queries", type=int, default=500, help="Square budget (PDQ)")
    g.add_argument("--attack-epsilon", type=fraction, default=8 / 255)


def register(evaluate_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the issue-13 ``evaluate`` subcommands."""
    p = evaluate_sub.add_parser("card", help="the whole suite: one JSON + markdown + plots")
    _common(p, "docs/evaluation/card.json")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.set_defaults(func=cmd_card)
    for part, text in (("apgd", "2AFC under APGD / Square (margin loss)"),
                       ("neardup", "near-duplicate ROC, per-edit detection, false-match rate"),
                       ("evasion", "evasion and impersonation at the threshold"),
                       ("agreement", "rank agreement and layer shares")):  # fmt: skip
        p = evaluate_sub.add_parser(part, help=text)
        _common(p, f"docs/evaluation/{part}.json")
        chosen = {"apgd": "2afc", "evasion": "attacks"}.get(part, part)
        p.set_defaults(func=cmd_card, parts=[chosen])
    p = evaluate_sub.add_parser(
        "card-table", help="render suite JSON(s) as markdown; several are merged (later wins)"
    )
    p.add_argument("json", nargs="+")
    p.add_argument("--out", help="also write the merged JSON, its .md and the plots here")
    p.set_defaults(func=cmd_table)
