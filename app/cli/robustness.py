"""``rlpips robustness``: a white-box PGD robustness check of one image pair."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from app.api.schemas import AttackParams, ModelOutcome, ThresholdBasis
from app.attacks.robustness import GOALS, AttackSpec, ModelResult, load_targets, robustness_check
from app.cli.args import add_attack_args, resolution_arg
from app.config import Settings, comma_list, pick_device
from app.imaging import load_tensor, to_unit
from app.metric.store import BASELINE_MODEL


def _pixels(path: str, resolution: int | None) -> torch.Tensor:
    """An image file → ``[3, H, W]`` in [0, 1] at the working resolution."""
    return to_unit(load_tensor(Path(path).read_bytes(), resolution))


def _save_paths(out: str, names: list[str]) -> list[Path]:
    """One model: ``OUT.png`` itself; several: ``OUT-<model>.png`` each."""
    p = Path(out)
    if len(names) == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{n}{p.suffix or '.png'}") for n in names]


def _print_table(spec: AttackSpec, results: list[ModelResult]) -> None:
    a = AttackParams.of(spec)
    print(
        f"attack {a.attack} eps={a.epsilon:.6g} steps={a.steps} step_size={a.step_size:.6g} "
        f"goal={a.goal} random_start={a.random_start} seed={a.seed}"
    )
    print(
        f"{'model':28s} {'clean':>9s} {'advers.':>9s} {'change':>9s} {'thr':>7s} flipped  linf     l2"
    )
    for r in results:
        print(
            f"{r.model:28s} {r.clean_distance:9.5f} {r.adversarial_distance:9.5f} "
            f"{r.change:+9.5f} {r.threshold:7.4f} {r.flipped!s:7s} "
            f"{r.linf:.5f}  {r.l2:.4f}"
        )


def cmd_robustness(args: argparse.Namespace, settings: Settings) -> int:
    store = settings.store()
    names = comma_list(args.models) or comma_list(
        [BASELINE_MODEL, settings.default_model or store.manifest.default]
    )
    ref = _pixels(args.reference, args.resolution)
    cand = None if args.candidate is None else _pixels(args.candidate, args.resolution)
    if cand is not None and cand.shape != ref.shape:
        raise ValueError(
            f"images differ in size ({ref.shape[2]}x{ref.shape[1]} vs {cand.shape[2]}x"
            f"{cand.shape[1]}); use --resolution N to compare them resized to NxN"
        )
    device = pick_device(args.device)
    targets, _ = load_targets(store, names, device)
    spec = AttackSpec(
        norm=args.attack,
        epsilon=args.epsilon,
        steps=args.steps,
        step_size=args.step_size,
        goal=args.goal,
        random_start=not args.no_random_start,
        seed=args.seed,
    )
    eff, results = robustness_check(
        ref.to(device), None if cand is None else cand.to(device), targets, spec
    )
    if args.save_adversarial:
        for path, r in zip(_save_paths(args.save_adversarial, names), results, strict=True):
            path.write_bytes(r.png())
    if args.json:  # the shape of the HTTP response, without timings
        out = {
            "attack": AttackParams.of(eff).model_dump(),
            "resolution": [int(ref.shape[1]), int(ref.shape[2])],
            "results": [
                ModelOutcome.of(r, ThresholdBasis.of(store.model(r.model), False)).model_dump(
                    exclude_none=True
                )
                for r in results
            ],
        }
        print(json.dumps(out))
    else:
        _print_table(eff, results)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("robustness", help="white-box PGD robustness check of one image pair")
    p.add_argument("reference")
    p.add_argument("candidate", nargs="?", help="default: the reference itself")
    p.add_argument(
        "--models",
        nargs="+",
        help="store models (space- or comma-separated; default lpips-alex + the default model)",
    )
    add_attack_args(p, 20, None, "linf 4/255, l2 1.0")
    p.add_argument("--goal", choices=GOALS, default="evade")
    p.add_argument(
        "--save-adversarial",
        metavar="OUT.png",
        help="write the 8-bit adversarial candidate (several models: OUT-<model>.png each)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--resolution", type=resolution_arg, default=256, help="'native' or N (default 256)"
    )
    p.set_defaults(func=cmd_robustness)
