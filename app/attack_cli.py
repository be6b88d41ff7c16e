"""``rlpips robustness`` and ``rlpips evaluate imagenet-attack``: PGD attacks from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from app.attacks import NORMS
from app.cli import pick_device, resolution_arg
from app.config import Settings
from app.imaging import ImageError, load_tensor
from app.robustness import GOALS, AttackSpec, ModelResult, load_targets, robustness_check


def model_list(values: list[str] | None) -> list[str]:
    """``--models a b`` and ``--models a,b`` alike; duplicates dropped, order kept."""
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def _pixels(path: str, resolution: int | None) -> torch.Tensor:
    """An image file → ``[3, H, W]`` in [0, 1] at the working resolution."""
    return (load_tensor(Path(path).read_bytes(), resolution) + 1) / 2


def _save_paths(out: str, names: list[str]) -> list[Path]:
    """One model: ``OUT.png`` itself; several: ``OUT-<model>.png`` each."""
    p = Path(out)
    if len(names) == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{n}{p.suffix or '.png'}") for n in names]


def _print_table(spec: AttackSpec, results: list[ModelResult]) -> None:
    a = spec.as_dict()
    print(
        f"attack {a['attack']} eps={a['epsilon']:.6g} steps={a['steps']} "
        f"step_size={a['step_size']:.6g} goal={a['goal']} random_start={a['random_start']} "
        f"seed={a['seed']}"
    )
    print(
        f"{'model':28s} {'clean':>9s} {'advers.':>9s} {'change':>9s} {'thr':>7s} flipped  linf     l2"
    )
    for r in results:
        d = r.as_dict()
        print(
            f"{r.model:28s} {r.clean_distance:9.5f} {r.adversarial_distance:9.5f} "
            f"{d['change']:+9.5f} {r.threshold:7.4f} {d['flipped']!s:7s} "
            f"{r.linf:.5f}  {r.l2:.4f}"
        )


def cmd_robustness(args: argparse.Namespace) -> int:
    settings = Settings()
    store = settings.store()
    names = model_list(args.models) or list(
        dict.fromkeys(["lpips-alex", settings.default_model or store.manifest.default])
    )
    ref = _pixels(args.reference, args.resolution)
    cand = None if args.candidate is None else _pixels(args.candidate, args.resolution)
    if cand is not None and cand.shape != ref.shape:
        raise ImageError(
            "validation_error",
            f"images differ in size ({ref.shape[2]}x{ref.shape[1]} vs {cand.shape[2]}x"
            f"{cand.shape[1]}); use --resolution N to compare them resized to NxN",
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
    if args.json:
        out: dict[str, Any] = {
            "attack": eff.as_dict(),
            "resolution": [int(ref.shape[1]), int(ref.shape[2])],
            "results": [r.as_dict() for r in results],
        }
        print(json.dumps(out))
    else:
        _print_table(eff, results)
    return 0


def add_attack_args(
    p: argparse.ArgumentParser, steps: int, step_size: float | None, epsilon_help: str
) -> None:
    """The PGD options shared by ``robustness`` and ``evaluate imagenet-attack``."""
    p.add_argument("--attack", choices=NORMS, default="linf", help="threat model (default linf)")
    p.add_argument(
        "--epsilon", type=float, help=f"radius in [0,1]-pixel units (default {epsilon_help})"
    )
    p.add_argument("--steps", type=int, default=steps, help=f"PGD steps (default {steps})")
    p.add_argument(
        "--step-size",
        type=float,
        default=step_size,
        help=f"step size in pixel units (default {step_size or '2.5*eps/steps'})",
    )
    p.add_argument("--seed", type=int, help="seed of the random start (default: fresh, reported)")
    p.add_argument("--no-random-start", action="store_true", help="start PGD at the clean image")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def register(sub: Any, evaluate_sub: Any) -> None:
    """Add ``robustness`` and ``evaluate imagenet-attack`` to the ``rlpips`` parser."""
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

    from app.attack_eval import register_imagenet_attack

    register_imagenet_attack(evaluate_sub, add_attack_args)
