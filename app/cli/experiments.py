"""``rlpips evaluate …``: experiments on the metric — the paper's ImageNet attack, near-duplicate
threshold calibration and 2AFC accuracy (clean and under attack)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from app.cli import evaluation
from app.cli.args import add_attack_args, add_device_arg, fraction, resolution_arg
from app.cli.train import add_data_args, load_data, synth_config
from app.config import Settings, comma_list, pick_device
from app.metric.store import BASELINE_MODEL, WeightsError
from app.training.datasets import SPLITS, kind_counts
from app.training.evaluate import TwoAFCAttack, evaluate, markdown_table
from app.training.imagenet_attack import (
    EPSILON,
    IMAGES,
    Experiment,
    default_models,
    run_experiment,
    write_report,
)
from app.training.model import load_metric


def _command() -> str:
    """How this run was invoked, for the reports."""
    return "rlpips " + shlex.join(sys.argv[1:])


def cmd_imagenet_attack(args: argparse.Namespace, settings: Settings) -> int:
    if args.resolution is None:
        raise ValueError("imagenet-attack batches images: give --resolution N, not 'native'")
    store = settings.store()
    exp = Experiment(
        images=Path(args.images),
        limit=args.limit,
        target=args.target,
        models=comma_list(args.models) or default_models(store),
        norm=args.attack,
        epsilon=EPSILON[args.attack] if args.epsilon is None else args.epsilon,
        steps=args.steps,
        step_size=args.step_size,
        random_start=not args.no_random_start,
        seed=0 if args.seed is None else args.seed,
        resolution=args.resolution,
        batch_size=args.batch_size,
    )
    summary = run_experiment(store, exp, pick_device(args.device), _command())
    json_path, png_path = write_report(summary, Path(args.out))
    for name, s in summary["models"].items():
        print(f"{name:28s} mean {s['mean']:.4f} median {s['median']:.4f}")
    for name in summary["skipped"]:
        print(f"{name:28s} skipped (weights unavailable)")
    print(f"wrote {json_path} and {png_path} in {summary['elapsed_s']}s")
    return 0


def cmd_thresholds(args: argparse.Namespace, settings: Settings) -> int:
    from app.evaluation.calibration import calibrate, manifest_entry
    from app.evaluation.scorers import LPIPSScorer
    from app.evaluation.suite import make_scorer

    if args.threads:
        torch.set_num_threads(args.threads)
    store = settings.store()
    report: dict[str, Any] = {"command": _command(), "models": {}}
    for name in args.models or store.names:
        try:
            scorer = make_scorer(name, store)
        except WeightsError as exc:  # not available offline: reported, not dropped
            report["models"][name] = {"skipped": str(exc).split(".")[0]}
            continue
        assert isinstance(scorer, LPIPSScorer)
        result = calibrate(scorer, Path(args.images), args.views, args.resolution, args.fmr)
        report["models"][name] = result
        print(f"{name}: threshold {result['threshold']} ({result['false_matches']} of "
              f"{result['pairs']} unrelated pairs match)", file=sys.stderr)  # fmt: skip
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    if args.write_manifest:
        path = store.root / "manifest.json"
        manifest = json.loads(path.read_text())
        for name, result in report["models"].items():
            if "threshold" in result:
                entry = manifest["models"][name]
                entry["threshold"] = result["threshold"]
                entry["calibration"] = manifest_entry(result)
        path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return 0


PROJECTION_NOTE = (
    "fitted by this project; not committed: `make projection` (or the command in the description) "
    "reproduces it into model_store/files/ from ../shared/images (docs/BANK.md)"
)


def cmd_bank_projection(args: argparse.Namespace, settings: Settings) -> int:
    """Fit a model's bank projection on the training split (docs/BANK.md) and store it."""
    from app.bank.projection import ALEX_GRIDS, fit_model, load, save
    from app.evaluation.data import training_files
    from app.metric.engine import Engine
    from app.metric.store import file_hashes

    if args.threads:
        torch.set_num_threads(args.threads)
    store = settings.store()
    engine = Engine(store, [args.model], torch.device("cpu"), args.resolution)
    engine.load()
    files = training_files(Path(args.images))
    basis = fit_model(engine, args.model, files, args.components, ALEX_GRIDS)
    store.cache_dir.mkdir(
        parents=True, exist_ok=True
    )  # git-ignored: the file is reproduced, not kept
    out = store.cache_dir / f"{args.model}.bank-projection.safetensors"
    # no command line in the file: the same fit must give the same bytes (the manifest pins them)
    note = (
        f"rlpips evaluate bank-projection {args.model} --resolution {args.resolution} "
        f"--components {args.components}: {len(files)} training-split images"
    )
    save(out, basis, ALEX_GRIDS, note)
    proj = load(out)
    print(f"wrote {out}: basis {tuple(proj.basis.shape)}, grids {proj.grids}", file=sys.stderr)
    if args.write_manifest:
        path = store.root / "manifest.json"
        manifest = json.loads(path.read_text())
        sha, _ = file_hashes(out)
        file_id = out.name.removesuffix(".safetensors")
        manifest["files"][file_id] = {
            "filename": out.name,
            "aliases": [],
            "url": None,
            "digests": [{"kind": "sha256", "value": sha, "note": PROJECTION_NOTE}],
            "license": manifest["files"][store.model(args.model).heads]["license"],
            "size": out.stat().st_size,
            "description": f"bank projection of {args.model} ({note}); docs/BANK.md",
        }
        manifest["models"][args.model]["bank_projection"] = file_id
        path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return 0


def cmd_2afc(args: argparse.Namespace, settings: Settings) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    store = settings.store()
    device = pick_device(args.device)
    data = load_data(args, args.split, store)
    spec = TwoAFCAttack(args.norm, args.epsilon, args.steps, args.step_size, args.seed)
    metrics = {name: load_metric(name, store) for name in args.models}  # fail before any work
    results: dict[str, dict[str, float]] = {}
    for name, metric in metrics.items():
        scores = evaluate(metric, data, spec, device=device, desc=name, progress=True)
        results[name] = scores.summary
    table = markdown_table(results, spec)
    report: dict[str, Any] = {
        "data": args.data
        if args.data != ["synth"]
        else {**asdict(synth_config(args)), "split": args.split},
        "counts": kind_counts(data),
        "attack": {**asdict(spec), "step_size": spec.effective_step_size, "target": "p0"},
        "results": results,
        "command": _command(),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    print(table)
    return 0


def _register_imagenet_attack(evaluate_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = evaluate_sub.add_parser(
        "imagenet-attack",
        help="the paper's experiment: PGD on trunk features, d(x, x_adv) per model",
    )
    p.add_argument(
        "--images", default=str(IMAGES), help="folder of images (default imagenet-sample)"
    )
    p.add_argument("--limit", type=int, default=100, help="first N images in name order")
    p.add_argument(
        "--target", default=BASELINE_MODEL, help="model whose trunk features are attacked"
    )
    p.add_argument("--models", nargs="+", help="models scored (default lpips-alex + r-lpips-*)")
    add_attack_args(p, 50, 0.01, "linf 0.05, l2 1.0")
    p.add_argument("--resolution", type=resolution_arg, default=224, help="N (default 224)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--out",
        default="docs/imagenet-attack",
        help="output prefix: writes PREFIX.json, PREFIX.png",
    )
    p.set_defaults(func=cmd_imagenet_attack)


def _register_thresholds(evaluate_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = evaluate_sub.add_parser(
        "thresholds",
        help="calibrate near-duplicate thresholds at a false-match rate on unrelated images",
        description="docs/CALIBRATION.md: the largest threshold at which at most --fmr of the pairs "
        "of views of different val-split images match",
    )
    p.add_argument("--models", nargs="*", help="store model names (default: all)")
    p.add_argument("--images", default="../shared/images/imagenet-sample")
    p.add_argument("--views", type=int, default=5, help="views per image (1..5)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--fmr", type=float, default=1e-5, help="false-match rate to calibrate at")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument(
        "--write-manifest", action="store_true", help="set the store's thresholds and calibration"
    )
    p.set_defaults(func=cmd_thresholds)


def _register_bank_projection(evaluate_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = evaluate_sub.add_parser(
        "bank-projection",
        help="fit a model's bank embedding (PCA of its lower-bound statistics) on training images",
    )
    p.add_argument("model", help="store model name")
    p.add_argument("--images", default="../shared/images/imagenet-sample")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--components", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument(
        "--write-manifest", action="store_true", help="name the file in the model's store entry"
    )
    p.set_defaults(func=cmd_bank_projection)


def _register_2afc(evaluate_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    e = evaluate_sub.add_parser("2afc", help="clean and adversarial 2AFC accuracy of models")
    add_data_args(e)
    e.add_argument("--split", choices=SPLITS, default="test")
    e.add_argument(
        "--models", nargs="+", default=[BASELINE_MODEL], help="store names or bundle paths"
    )
    e.add_argument("--norm", choices=["linf", "l2"], default="linf")
    e.add_argument("--epsilon", type=fraction, default=4 / 255)
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--step-size", type=fraction)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", type=Path, help="write the report as JSON")
    e.add_argument("--markdown", type=Path, help="write the table as markdown")
    e.add_argument("--threads", type=int, default=0)
    add_device_arg(e)
    e.set_defaults(func=cmd_2afc)


def register(evaluate_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add every ``evaluate`` subcommand."""
    _register_imagenet_attack(evaluate_sub)
    _register_thresholds(evaluate_sub)
    _register_bank_projection(evaluate_sub)
    _register_2afc(evaluate_sub)
    evaluation.register(evaluate_sub)
