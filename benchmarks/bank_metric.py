"""The bank's metric-side numbers on natural images (ImageNet sample), no service: how much the
lower-bound embedding prunes (grids 1/2/4, both models), the false-match rate per pair of unrelated
images at the default threshold, and how near copies (benign edits, flips with the mirror option,
PGD L∞ 8/255 evasion attacks) fare — caught by the exact distance at all, and ranked within the first K
by the embedding (what a search checking at most K items finds).

Ranks at bank sizes beyond the sample are extrapolated: the expected number of unrelated items that
outrank the original in a bank of N is ``N · P(bound(unrelated) < bound(copy, original))``, with the
probability measured on the sample's unrelated pairs.

    nice -n 10 python -m benchmarks.bank_metric --images 300 --resolution 256 --out docs/benchmarks/bank_metric.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageDraw, ImageEnhance, ImageFilter

from app.attacks.pgd import default_step_size, pgd, quantize
from app.bank.embedding import embed
from app.config import Settings
from app.imaging import load_tensor, to_unit
from app.metric.engine import Engine
from app.metric.lpips import distance_from_features
from app.metric.queries import Image
from benchmarks.loadgen import IMAGENET

log = logging.getLogger("benchmarks.bank_metric")
MODELS = ["r-lpips-alex-linf-synth", "lpips-alex"]
GRIDS = (1, 2, 4)
KS = (1, 4, 8, 16, 32, 64)
SIZES = (10_000, 100_000)


def _save(img: PILImage.Image, fmt: str = "PNG", **kw: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def _crop(img: PILImage.Image, share: float) -> PILImage.Image:
    """Remove ``share`` of the width and of the height (half on each side)."""
    w, h = img.size
    dx, dy = int(w * share / 2), int(h * share / 2)
    return img.crop((dx, dy, w - dx, h - dy))


def _overlay(img: PILImage.Image) -> PILImage.Image:
    """A caption bar over the bottom 10 % with text, and a semi-opaque logo box in a corner."""
    img = img.copy()
    w, h = img.size
    d = ImageDraw.Draw(img, "RGBA")
    d.rectangle((0, int(h * 0.9), w, h), fill=(0, 0, 0, 200))
    d.text((int(w * 0.05), int(h * 0.92)), "SALE  @someone  #repost", fill=(255, 255, 255, 255))
    d.rectangle((int(w * 0.8), 0, w, int(h * 0.12)), fill=(255, 255, 255, 140))
    return img


#: Benign edits (on the original upload, before the service's decode + resize).
EDITS: dict[str, Callable[[PILImage.Image], bytes]] = {
    "jpeg_q30": lambda im: _save(im, "JPEG", quality=30),
    "rescale_0.5": lambda im: _save(im.resize((im.width // 2, im.height // 2))),
    "blur_r2": lambda im: _save(im.filter(ImageFilter.GaussianBlur(2))),
    "brightness_1.2": lambda im: _save(ImageEnhance.Brightness(im).enhance(1.2)),
    "overlay": lambda im: _save(_overlay(im)),
    "crop_5pct": lambda im: _save(_crop(im, 0.05)),
    "crop_10pct": lambda im: _save(_crop(im, 0.10)),
    "hflip_jpeg_q75_mirror": lambda im: _save(
        im.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT), "JPEG", quality=75
    ),
}


def _pairs_distance(
    engine: Engine,
    model: str,
    fa: list[torch.Tensor],
    fb: list[torch.Tensor],
    ia: torch.Tensor | None = None,
    ib: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distances ``[P]`` between rows ``ia`` of ``fa`` and rows ``ib`` of ``fb`` (default: row by
    row), gathered in chunks (a 256² pair holds 640k feature values)."""
    n = int(fa[0].shape[0]) if ia is None else int(ia.numel())
    ia = torch.arange(n) if ia is None else ia
    ib = torch.arange(n) if ib is None else ib
    out = []
    with torch.inference_mode():
        for s in range(0, n, 128):
            a, b = ia[s : s + 128], ib[s : s + 128]
            res = distance_from_features(
                engine.heads[model], [f[a] for f in fa], [f[b] for f in fb]
            )
            out.append(res.total)
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300, help="bank sample of natural images")
    p.add_argument("--copies", type=int, default=100, help="images whose copies are searched")
    p.add_argument("--attacked", type=int, default=20, help="images attacked with PGD")
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    settings = Settings()
    store = settings.store()
    engine = Engine(store, MODELS, torch.device("cpu"), args.resolution)
    engine.load()
    files = sorted(IMAGENET.glob("*.JPEG"))[: args.images]
    raw = [f.read_bytes() for f in files]
    r = args.resolution
    t0 = time.perf_counter()
    imgs = [Image(load_tensor(b, r), f.name) for b, f in zip(raw, files, strict=True)]
    feats = _features(engine, imgs)
    trunk_s = (time.perf_counter() - t0) / len(imgs)
    n = len(imgs)
    i0, i1 = torch.triu_indices(n, n, 1)
    report: dict[str, object] = {
        "images": n,
        "resolution": r,
        "unrelated_pairs": int(i0.numel()),
        "trunk_and_decode_s_per_image": round(trunk_s, 4),
        "models": {},
    }
    for model in MODELS:
        report["models"][model] = _model_report(
            engine, model, store.model(model).threshold, raw, feats, i0, i1, args
        )  # type: ignore[index]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _features(engine: Engine, imgs: list[Image]) -> list[torch.Tensor]:
    parts = [engine.image_features(MODELS[0], imgs[s : s + 16]) for s in range(0, len(imgs), 16)]
    return [torch.cat([b[layer] for b in parts]) for layer in range(len(parts[0]))]


def _model_report(
    engine: Engine,
    model: str,
    thr: float,
    raw: list[bytes],
    feats: list[torch.Tensor],
    i0: torch.Tensor,
    i1: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, object]:
    heads = engine.heads[model]
    true = _pairs_distance(engine, model, feats, feats, i0, i1).numpy()
    fp = int((true <= thr).sum())
    out: dict[str, object] = {
        "threshold": thr,
        "false_match_rate_per_pair": fp / true.size,
        "false_matches_per_search_10k_bank": 10_000 * fp / true.size,
        "threshold_for_1e-5_per_pair": float(np.quantile(true, 1e-5)),
        "unrelated_distance_p1_p50": [float(np.quantile(true, 0.01)), float(np.median(true))],
    }
    embs = {g: embed(heads, feats, g).numpy() for g in GRIDS}
    unrelated_bounds = {}
    for g, e in embs.items():
        b = ((e[i0.numpy()] - e[i1.numpy()]) ** 2).sum(1)
        unrelated_bounds[g] = np.sort(b)
        out[f"grid{g}"] = {
            "dimension": int(e.shape[1]),
            "survive_range_search": float((b <= thr).mean()),
            "bound_over_distance_median": float(np.median(b / true)),
        }
    copies = _copies(engine, model, thr, raw, feats, embs, unrelated_bounds, args)
    out["copies"] = copies
    return out


def _rank_stats(bounds: np.ndarray, unrelated: np.ndarray) -> dict[str, object]:
    """Per bank size: the share of copies whose original is expected within the first K."""
    p_above = np.searchsorted(unrelated, bounds) / unrelated.size  # P(unrelated bound < copy's)
    return {str(n): {f"found@{k}": float((n * p_above < k).mean()) for k in KS} for n in SIZES}


def _copies(
    engine: Engine,
    model: str,
    thr: float,
    raw: list[bytes],
    feats: list[torch.Tensor],
    embs: dict[int, np.ndarray],
    unrelated: dict[int, np.ndarray],
    args: argparse.Namespace,
) -> dict[str, object]:
    r = args.resolution
    heads = engine.heads[model]
    m = min(args.copies, len(raw))
    res: dict[str, object] = {}
    for name, edit in EDITS.items():
        mirror = name.startswith("hflip")
        queries = [
            Image(load_tensor(edit(PILImage.open(io.BytesIO(b)).convert("RGB")), r), f"{name}{k}")
            for k, b in enumerate(raw[:m])
        ]
        if (
            mirror
        ):  # the mirror option: the query's mirror searches too, the smaller distance counts
            queries = [Image(q.tensor.flip(-1), q.key + ":m") for q in queries]
        res[name] = _score(engine, model, heads, thr, queries, feats, embs, unrelated, m)
    # PGD L∞ 8/255 against the model: push the stored original's copy away from it (evasion)
    a = min(args.attacked, len(raw))
    metric = engine.metric(model)
    clean = torch.stack([load_tensor(b, r) for b in raw[:a]])
    x = to_unit(clean)

    def loss(x_adv: torch.Tensor) -> torch.Tensor:
        return metric(clean, x_adv * 2 - 1)

    eps = 8 / 255
    adv = pgd(
        loss,
        x,
        norm="linf",
        epsilon=eps,
        steps=args.attack_steps,
        step_size=default_step_size("linf", eps, args.attack_steps),
        random_start=True,
    )
    adv = quantize(adv, x, "linf", eps)
    queries = [Image(t * 2 - 1, f"pgd{k}") for k, t in enumerate(adv.float())]
    res["pgd_linf_8_255"] = _score(engine, model, heads, thr, queries, feats, embs, unrelated, a)
    return res


def _score(
    engine: Engine,
    model: str,
    heads: object,
    thr: float,
    queries: list[Image],
    feats: list[torch.Tensor],
    embs: dict[int, np.ndarray],
    unrelated: dict[int, np.ndarray],
    m: int,
) -> dict[str, object]:
    qf = _features(engine, queries)
    d = _pairs_distance(engine, model, qf, [f[:m] for f in feats]).numpy()
    out: dict[str, object] = {
        "n": m,
        "caught_by_exact_distance": float((d <= thr).mean()),
        "distance_median_p95": [float(np.median(d)), float(np.quantile(d, 0.95))],
    }
    for g in GRIDS:
        qe = embed(engine.heads[model], qf, g).numpy()
        b = ((qe - embs[g][:m]) ** 2).sum(1)
        ranks = _rank_stats(b, unrelated[g])
        out[f"grid{g}"] = {
            n: {k: v for k, v in found.items()}
            for n, found in ranks.items()  # type: ignore[union-attr]
        }
        out[f"grid{g}_caught_and_found@16_100k"] = float(
            (
                (d <= thr) & (100_000 * np.searchsorted(unrelated[g], b) / unrelated[g].size < 16)
            ).mean()
        )
    return out


if __name__ == "__main__":
    main()
