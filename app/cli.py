"""The ``rlpips`` command line: distances, the model store, the server (and more, registered below)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from app.config import Settings
from app.imaging import ImageError, heatmap_png, load_tensor
from app.metric.store import ModelStore, WeightsError

Handler = Callable[[argparse.Namespace], int]


def resolution_arg(value: str) -> int | None:
    """``native`` → ``None``; a positive integer N → N (images resized to N×N)."""
    if value == "native":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"resolution must be 'native' or an integer, got {value!r}"
        ) from None
    if not 16 <= n <= 4096:
        raise argparse.ArgumentTypeError(f"resolution must be between 16 and 4096, got {n}")
    return n


def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _store(settings: Settings) -> ModelStore:
    return settings.store()


def cmd_distance(args: argparse.Namespace) -> int:
    settings = Settings()
    store = _store(settings)
    name = args.model or settings.default_model or store.manifest.default
    device = pick_device(args.device)
    x0 = load_tensor(Path(args.image_a).read_bytes(), args.resolution)[None]
    x1 = load_tensor(Path(args.image_b).read_bytes(), args.resolution)[None]
    if x0.shape != x1.shape:
        raise ImageError(
            "validation_error",
            f"images differ in size ({x0.shape[3]}x{x0.shape[2]} vs {x1.shape[3]}x{x1.shape[2]}); "
            "use --resolution N to compare them resized to NxN",
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


def cmd_store_list(args: argparse.Namespace) -> int:
    store = _store(Settings())
    for name, m in store.manifest.models.items():
        ok = all(store.status(f).path is not None for f in store.files_of(name))
        default = " (default)" if name == store.manifest.default else ""
        print(f"{name:28s} {'available' if ok else 'missing':9s} {m.variant}{default}")
    return 0


def cmd_store_pull(args: argparse.Namespace) -> int:
    store = _store(Settings())
    for file_id, path in store.pull(args.name).items():
        print(f"{file_id}: {path}")
    return 0


def cmd_store_import(args: argparse.Namespace) -> int:
    store = _store(Settings())
    found = store.import_dir(Path(args.folder))
    for file_id, path in found.items():
        print(f"imported {file_id}: {path}")
    if not found:
        print(f"no manifest file found in {args.folder}", file=sys.stderr)
        return 1
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    """Verify every file that is present; exit 1 if any present file is corrupt or a named one missing."""
    store = _store(Settings())
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


def _exit_after_shutdown(signum: int, frame: object) -> None:
    """Uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown: end with status 0, no trace."""
    raise SystemExit(0)


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from app.server import serve

    logging.getLogger("app").setLevel(args.log_level.upper())
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_after_shutdown)
    settings = Settings() if args.grace is None else Settings(grace_s=args.grace)
    if args.workers == 1:  # drain period, then a graceful shutdown bounded by the grace period
        serve(settings, args.host, args.port, args.log_level)
        return 0
    uvicorn.run(  # several processes: uvicorn's supervisor (graceful, without the drain period)
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        timeout_graceful_shutdown=max(1, int(settings.grace_s)),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlpips", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distance", help="LPIPS / R-LPIPS distance between two images")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--model", help="model name (default: the store's default)")
    p.add_argument(
        "--resolution", type=resolution_arg, default=256, help="'native' or N (default 256)"
    )
    p.add_argument("--spatial", metavar="OUT.png", help="write the spatial distance heat map")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_distance)

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

    p = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--grace",
        type=float,
        default=None,
        help="graceful shutdown bound in seconds, signal to exit (default: RLPIPS_GRACE_S or 30)",
    )
    p.set_defaults(func=cmd_serve)

    evaluate = sub.add_parser("evaluate", help="experiments and benchmarks of the metric")
    evaluate_sub = evaluate.add_subparsers(dest="evaluate_command", required=True)
    for module in EXTENSIONS:
        importlib.import_module(module).register(sub, evaluate_sub)
    return parser


#: Modules whose ``register(subcommands, evaluate_subcommands)`` adds their own subcommands
#: (attacks, training), so each feature keeps its CLI beside its code.
EXTENSIONS: tuple[str, ...] = ("app.calibration", "app.attack_cli", "app.training.cli")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (WeightsError, ImageError, KeyError, FileNotFoundError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"rlpips: error: {msg}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
