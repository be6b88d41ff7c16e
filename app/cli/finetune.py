"""``rlpips finetune``: robust fine-tuning of LPIPS-alex (trunk + heads) with the objective of
:mod:`app.training.robust`; ``rlpips finetune-threshold``: a model's FMR-1e-5 threshold on the *val*
sources' unrelated pairs, with its detection of geometric edits of the val sources there."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from app.cli.args import add_device_arg, fraction
from app.config import Settings, pick_device
from app.evaluation import data as evaldata
from app.evaluation import neardup
from app.evaluation.calibration import calibrate
from app.evaluation.scorers import LPIPSScorer
from app.evaluation.suite import make_scorer
from app.metric.store import BASELINE_MODEL
from app.training.finetune import FineTuner, export
from app.training.robust import RobustConfig, SourcePool, train_sources

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_IMAGES = ROOT.parent / "shared" / "images" / "imagenet-sample"
VAL_EDITS = ["jpeg-q75", "crop-10pct", "crop-20pct", "rotate-5deg", "translate-3pct", "hflip"]


def robust_config(args: argparse.Namespace) -> RobustConfig:
    return RobustConfig(
        steps=args.steps, batch=args.batch, image_size=args.image_size, patch=args.patch,
        lr=args.lr, head_lr=args.head_lr, decay_from=args.decay_from, epsilon=args.epsilon,
        attack_steps=args.attack_steps, w_distill=args.w_distill, w_adv=args.w_adv,
        w_geo=args.w_geo, w_balance=args.w_balance, w_rank=args.w_rank,
        w_adv_view=args.w_adv_view,
        rank_margin=args.rank_margin, pos_margin=args.pos_margin,
        neg_margin=args.neg_margin, max_share=args.max_share, crop=args.crop, rotate=args.rotate,
        shift=args.shift, flip=args.flip, seed=args.seed,
    )  # fmt: skip


def cmd_finetune(args: argparse.Namespace, settings: Settings) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("app").setLevel(logging.INFO)
    store = settings.store()
    device = pick_device(args.device)
    cfg = robust_config(args)
    tuner = FineTuner(cfg, SourcePool.load(train_sources(args.images_dir), args.pool_size),
                      args.out, device, args.save_every, args.log_every, not args.no_progress)  # fmt: skip
    if not args.resume and tuner.checkpoint_path().exists():
        raise FileExistsError(f"{tuner.checkpoint_path()} exists: pass --resume or another --out")
    print(f"fine-tuning {args.teacher} on {len(tuner.pool)} train sources; config {asdict(cfg)}",
          file=sys.stderr)  # fmt: skip
    student = tuner.run(store.load(args.teacher), stop_after=args.stop_after)
    state = torch.load(tuner.checkpoint_path(), map_location="cpu", weights_only=True)
    if int(state["step"]) < cfg.steps:
        print(f"stopped at step {state['step']} of {cfg.steps}; continue with --resume")
        return 0
    meta = {
        "finetune_config": json.dumps(asdict(cfg)),
        "teacher": args.teacher,
        "images": str(Path(args.images_dir).name),
        "command": "rlpips " + shlex.join(sys.argv[1:]),
    }
    export(student.cpu(), args.out / "model.safetensors", meta)
    print(f"wrote {args.out / 'model.safetensors'}")
    return 0


def cmd_threshold(args: argparse.Namespace, settings: Settings) -> int:
    """The calibrated threshold (:func:`app.evaluation.calibration.calibrate`: FMR on the val sources'
    unrelated views) of candidate models, and the val sources' detection of geometric edits at it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    val = evaldata.calibration_files(args.images_dir)
    orig, edited, names = evaldata.edited_pairs(val, VAL_EDITS, args.resolution)
    report: dict[str, object] = {"command": "rlpips " + shlex.join(sys.argv[1:]),
                                 "val_sources": len(val), "resolution": args.resolution}  # fmt: skip
    for model in args.models:
        scorer = make_scorer(model, settings.store())
        assert isinstance(scorer, LPIPSScorer)
        cal = calibrate(scorer, args.images_dir, args.negative_views, args.resolution, args.fmr)
        thr = cal["threshold"]
        pos = neardup.positive_distances(scorer, orig, edited)
        det = {e: float((pos[[k for k, n in enumerate(names) if n == e]] <= thr).double().mean())
               for e in VAL_EDITS}  # fmt: skip
        report[model] = {"threshold": thr, "fmr": args.fmr, "n_negatives": cal["pairs"],
                         "min_negative": cal["smallest_unrelated"][0], "detection": det}  # fmt: skip
        print(json.dumps({model: report[model]}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = RobustConfig()
    p = sub.add_parser("finetune", help="robust fine-tuning of LPIPS-alex (trunk + heads)")
    p.add_argument("--images-dir", type=Path, default=DEFAULT_IMAGES,
                   help="source images (only the train split of split_sources is read)")  # fmt: skip
    p.add_argument("--pool-size", type=int, default=160, help="sources are resized to this²")
    p.add_argument("--teacher", default=BASELINE_MODEL, help="store model to start from and match")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimiser steps")
    p.add_argument("--stop-after", type=int, help="stop after N more steps (resume later)")
    p.add_argument("--batch", type=int, default=d.batch, help="source images per step")
    p.add_argument("--image-size", type=int, default=d.image_size, help="geometric views' side")
    p.add_argument("--patch", type=int, default=d.patch, help="distortion patches' side")
    p.add_argument("--lr", type=float, default=d.lr, help="trunk learning rate")
    p.add_argument("--head-lr", type=float, default=d.head_lr)
    p.add_argument("--decay-from", type=float, default=d.decay_from,
                   help="fraction of the steps after which the lr decays linearly to 0")  # fmt: skip
    p.add_argument("--epsilon", type=fraction, default=d.epsilon, help="L-inf radius (pixels)")
    p.add_argument("--attack-steps", type=int, default=d.attack_steps)
    for name in ("distill", "adv", "geo", "balance", "rank", "adv_view"):
        p.add_argument(f"--w-{name.replace('_', '-')}", type=float, default=getattr(d, f"w_{name}"))
    p.add_argument("--rank-margin", type=float, default=d.rank_margin)
    p.add_argument("--pos-margin", type=float, default=d.pos_margin)
    p.add_argument("--neg-margin", type=float, default=d.neg_margin)
    p.add_argument("--max-share", type=float, default=d.max_share)
    p.add_argument("--crop", type=float, default=d.crop, help="max crop per side (fraction)")
    p.add_argument("--rotate", type=float, default=d.rotate, help="max rotation (degrees)")
    p.add_argument("--shift", type=float, default=d.shift, help="max shift (fraction)")
    p.add_argument("--flip", type=float, default=d.flip, help="mirror probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("finetune-threshold",
                       help="FMR threshold on the val sources' unrelated pairs (model selection)")  # fmt: skip
    p.add_argument("models", nargs="+", help="store names or bundle paths")
    p.add_argument("--images-dir", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--negative-views", type=int, default=5, help="crop views per val source")
    p.add_argument("--fmr", type=float, default=neardup.FMR_TARGET)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_threshold)
