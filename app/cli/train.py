"""``rlpips train``: adversarial 2AFC training of R-LPIPS heads, and the 2AFC data options it shares
with ``rlpips evaluate 2afc``."""

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
from app.metric.store import BASELINE_MODEL, ModelStore
from app.training.datasets import (
    Split,
    SynthConfig,
    TripletSet,
    cached_split,
    kind_counts,
    read_bapps,
)
from app.training.evaluate import TwoAFCAttack, evaluate
from app.training.model import TwoAFCModel
from app.training.train import TARGETS, TrainConfig, Trainer, export

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_IMAGES = ROOT.parent / "shared" / "images" / "imagenet-sample"
DEFAULT_CACHE = ROOT / "runs" / "data"
log = logging.getLogger(__name__)


def sizes(value: str) -> tuple[int, int, int]:
    parts = [int(v) for v in value.split(",")]
    if len(parts) != 3 or min(parts) < 0:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL,TEST triplet counts, got {value!r}")
    return parts[0], parts[1], parts[2]


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=["synth"],
                   help="'synth' (generated from --images-dir) or BAPPS 2AFC folder(s)")  # fmt: skip
    g.add_argument(
        "--images-dir", type=Path, default=DEFAULT_IMAGES, help="source images for synth"
    )
    g.add_argument("--data-seed", type=int, default=0, help="synthetic data seed")
    g.add_argument(
        "--synth-sizes", type=sizes, default=(20000, 1000, 2000), metavar="TRAIN,VAL,TEST"
    )
    g.add_argument("--teacher-fraction", type=float, default=1 / 3,
                   help="share of synthetic triplets with different distortions, labelled by LPIPS v0.1")  # fmt: skip
    g.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="where generated sets are kept"
    )
    g.add_argument("--limit", type=int, help="use only the first N triplets")


def synth_config(args: argparse.Namespace) -> SynthConfig:
    return SynthConfig(
        images_dir=str(args.images_dir), seed=args.data_seed, sizes=args.synth_sizes,
        teacher_fraction=args.teacher_fraction,
    )  # fmt: skip


def load_data(args: argparse.Namespace, split: Split, store: ModelStore) -> TripletSet:
    """The requested split (synthetic) or the BAPPS folders given by ``--data``."""
    if args.data == ["synth"]:
        cfg = synth_config(args)
        data = cached_split(
            cfg,
            split,
            args.cache_dir,
            lambda: store.load(cfg.teacher),
            progress=sys.stderr.isatty(),
        )
    else:
        data = read_bapps([Path(p) for p in args.data])
    if args.limit is not None:
        data = data.subset(range(min(args.limit, len(data))))
    return data


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        mode=args.mode, attack=args.attack, norm=args.norm,
        epsilon=args.epsilon if args.epsilon is not None else (4 / 255 if args.norm == "linf" else 0.5),
        attack_steps=args.attack_steps, step_size=args.step_size, lr=args.lr, beta1=args.beta1,
        batch_size=args.batch_size, epochs=args.epochs, epochs_decay=args.epochs_decay, seed=args.seed,
    )  # fmt: skip


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("app").setLevel(logging.INFO)
    store = settings.store()
    device = pick_device(args.device)
    cfg = train_config(args)
    data = load_data(args, "train", store)
    val = load_data(args, "val", store) if args.data == ["synth"] and args.val_limit else None
    print(
        f"training on {len(data)} triplets {kind_counts(data)}; config {asdict(cfg)}",
        file=sys.stderr,
    )
    spec = TwoAFCAttack(steps=args.val_steps, seed=args.seed)

    def on_epoch(epoch: int, model: TwoAFCModel) -> dict[str, float]:
        if val is None:
            return {}
        r = evaluate(
            model.metric, val.subset(range(min(args.val_limit, len(val)))), spec, device=device
        )
        return {"val_clean": r.summary["clean"], "val_adversarial": r.summary["adversarial"]}

    trainer = Trainer(cfg, data, args.out, device, args.save_every, not args.no_progress, on_epoch)
    if not args.resume and trainer.checkpoint_path().exists():
        raise FileExistsError(f"{trainer.checkpoint_path()} exists: pass --resume or another --out")
    trunk = store.load_trunk(BASELINE_MODEL)
    model = trainer.run(trunk)
    meta = {
        "train_config": json.dumps(asdict(cfg)),
        "data": json.dumps(asdict(synth_config(args)) if args.data == ["synth"] else args.data),
        "command": "rlpips " + shlex.join(sys.argv[1:]),
    }
    export(model, args.out / "heads.safetensors", meta)
    print(f"wrote {args.out / 'heads.safetensors'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("train", help="adversarially train R-LPIPS heads on 2AFC data")
    add_data_args(p)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "train", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--mode", choices=["heads", "tune"], default="heads")
    p.add_argument("--attack", choices=list(TARGETS), default="p0", help="which image PGD perturbs")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--epsilon", type=fraction, help="pixel units (default 4/255 linf, 0.5 l2)")
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--step-size", type=fraction, help="default 2.5·ε/steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta1", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--epochs", type=int, default=5, help="epochs at the constant learning rate")
    p.add_argument("--epochs-decay", type=int, default=5, help="epochs of linear decay to 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N batches")
    p.add_argument(
        "--val-limit", type=int, default=500, help="val triplets scored per epoch (0: none)"
    )
    p.add_argument(
        "--val-steps", type=int, default=20, help="PGD steps of the per-epoch val attack"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)
