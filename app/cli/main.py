"""The ``rlpips`` command line: distances, the model store, and the subcommands registered below.

Every subcommand's handler takes the parsed arguments and the settings (built once, here, from the
``RLPIPS_*`` environment) and returns the exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from app.cli import bank, cluster, experiments, finetune, robustness, serve, train
from app.cli.args import add_device_arg, resolution_arg
from app.cli.remote import add_remote_args, cmd_remote_distance
from app.config import Settings, pick_device
from app.imaging import ImageError, heatmap_png, load_tensor
from app.metric.store import WeightsError


def cmd_distance(args: argparse.Namespace, settings: Settings) -> int:
    if args.url:
        return cmd_remote_distance(args)
    store = settings.store()
    name = args.model or settings.default_model or store.manifest.default
    device = pick_device(args.device)
    x0 = load_tensor(Path(args.image_a).read_bytes(), args.resolution)[None]
    x1 = load_tensor(Path(args.image_b).read_bytes(), args.resolution)[None]
    if x0.shape != x1.shape:
        raise ValueError(
            f"images differ in size ({x0.shape[3]}x{x0.shape[2]} vs {x1.shape[3]}x{x1.shape[2]}); "
            "use --resolution N to compare them resized to NxN"
        )
    metric = store.load(name, device)
    with torch.inference_mode():
        res = metric.compare(x0.to(device), x1.to(device), spatial=args.spatial is not None)
    if args.spatial is not None and res.spatial is not None:
        Path(args.spatial).write_bytes(heatmap_png(res.spatial[0]))
    distance = float(res.total[0])
    per_layer = [float(v) for v in res.per_layer[0]]
    if args.json:
        out = {
            "model": name,
            "distance": distance,
            "per_layer": per_layer,
            "resolution": [int(x0.shape[2]), int(x0.shape[3])],
        }
        print(json.dumps(out))
    else:
        print(f"{distance:.6f}")
    return 0


def cmd_store_list(args: argparse.Namespace, settings: Settings) -> int:
    store = settings.store()
    for name, m in store.manifest.models.items():
        ok = all(store.status(f).path is not None for f in store.files_of(name))
        default = " (default)" if name == store.manifest.default else ""
        print(f"{name:28s} {'available' if ok else 'missing':9s} {m.variant}{default}")
    return 0


def cmd_store_pull(args: argparse.Namespace, settings: Settings) -> int:
    for file_id, path in settings.store().pull(args.name).items():
        print(f"{file_id}: {path}")
    return 0


def cmd_store_import(args: argparse.Namespace, settings: Settings) -> int:
    found = settings.store().import_dir(Path(args.folder))
    for file_id, path in found.items():
        print(f"imported {file_id}: {path}")
    if not found:
        print(f"no manifest file found in {args.folder}", file=sys.stderr)
        return 1
    return 0


def cmd_store_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Verify every file that is present; exit 1 if any present file is corrupt or a named one missing."""
    store = settings.store()
    bad = 0
    wanted = set(args.models or [])
    for file_id, entry in store.manifest.files.items():
        st = store.status(file_id)
        needed = any(file_id in store.files_of(m) for m in wanted)
        if st.path is not None:
            print(f"ok       {file_id:26s} {st.path}")
        elif st.problem and "not found" not in st.problem:
            bad += 1
            print(f"CORRUPT  {file_id:26s} {st.problem}")
        else:
            bad += needed
            print(f"{'MISSING' if needed else 'absent':8s} {file_id:26s} {entry.filename}")
    return 1 if bad else 0


def _register_distance(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("distance", help="LPIPS / R-LPIPS distance between two images")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--model", help="model name (default: the store's default)")
    p.add_argument(
        "--resolution", type=resolution_arg, default=256, help="'native' or N (default 256)"
    )
    p.add_argument("--spatial", metavar="OUT.png", help="write the spatial distance heat map")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    add_device_arg(p)
    add_remote_args(p)
    p.set_defaults(func=cmd_distance)


def _register_store(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    store = sub.add_parser("store", help="model store: list, pull, import, verify").add_subparsers(
        dest="store_command", required=True
    )
    store.add_parser("list", help="models and whether their files are available").set_defaults(
        func=cmd_store_list
    )
    p = store.add_parser("pull", help="download a model's files from upstream, verified")
    p.add_argument("name")
    p.set_defaults(func=cmd_store_pull)
    p = store.add_parser("import", help="copy verified files from a local folder into the store")
    p.add_argument("folder")
    p.set_defaults(func=cmd_store_import)
    p = store.add_parser("verify", help="check the hash of every available file")
    p.add_argument("models", nargs="*", help="models whose files must be present")
    p.set_defaults(func=cmd_store_verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlpips", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _register_distance(sub)
    _register_store(sub)
    serve.register(sub)
    cluster.register(sub)
    robustness.register(sub)
    bank.register(sub)
    train.register(sub)
    finetune.register(sub)
    evaluate = sub.add_parser("evaluate", help="experiments and benchmarks of the metric")
    experiments.register(evaluate.add_subparsers(dest="evaluate_command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args, Settings())
    except (WeightsError, ImageError, KeyError, FileNotFoundError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"rlpips: error: {msg}", file=sys.stderr)
        return 2
    return code
