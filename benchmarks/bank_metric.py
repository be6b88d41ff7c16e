"""The bank's metric-side numbers on natural images (ImageNet sample), no service: how much the
lower-bound embedding prunes (grids 1/2/4, both models), the false-match rate per pair of unrelated
images at the default threshold, and how near copies (benign edits, flips with the mirror option,
PGD L∞ 8/255 evasion attacks) fare — caught by the exact distance at all, and ranked within the first K
by the embedding (what a search checking at most K items finds).

A copy is *found@K* at bank size N when its exact distance is under the threshold and the expected
number of unrelated items outranking its original by the bound, ``N · P(bound(unrelated pair) <
bound(copy, original))`` (the probability measured on the sample's unrelated pairs), is below K: a
search checking the K lowest bounds then reaches it. Sizes beyond the sample are extrapolated that way.
All pair distances come from one Gram matrix of the flattened weighted features (checked against the
engine's distance to 1e-4).

    nice -n 10 python -m benchmarks.bank_metric --images 300 --resolution 256 --out docs/benchmarks/bank_metric.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageDraw, ImageEnhance, ImageFilter

from app.attacks.pgd import default_step_size, pgd, quantize
from app.bank.embedding import embed
from app.config import Settings
from app.imaging import load_tensor, to_unit
from app.metric.engine import Engine
from app.metric.lpips import Heads, distance_from_features
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


def _flat(heads: Heads, feats: list[torch.Tensor]) -> torch.Tensor:
    """``[N, D]`` with ``‖flat(x) − flat(y)‖² = LPIPS(x, y)``: each layer's ``sqrt(w)·f̂ / sqrt(H·W)``
    flattened (so all pairs come from one Gram matrix instead of one pass per pair)."""
    parts = []
    for f, w in zip(feats, heads.weights, strict=True):
        hw = f.shape[2] * f.shape[3]
        parts.append((f * w.detach().sqrt() / hw**0.5).reshape(f.shape[0], -1))
    return torch.cat(parts, dim=1)


def _all_pairs(flat: torch.Tensor) -> np.ndarray:
    """Squared distances of every pair ``i < j`` of the rows of ``flat``."""
    x = flat.double() if flat.shape[0] <= 64 else flat
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * (x @ x.T)).clamp_min(0)
    i0, i1 = torch.triu_indices(flat.shape[0], flat.shape[0], 1)
    return d[i0, i1].double().numpy()


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
    store = Settings().store()
    engine = Engine(store, MODELS, torch.device("cpu"), args.resolution)
    engine.load()
    files = sorted(IMAGENET.glob("*.JPEG"))[: args.images]
    raw = [f.read_bytes() for f in files]
    r = args.resolution
    t0 = time.perf_counter()
    feats = _features(
        engine, [Image(load_tensor(b, r), f.name) for b, f in zip(raw, files, strict=True)]
    )
    trunk_s = (time.perf_counter() - t0) / len(raw)
    n = len(raw)
    report: dict[str, Any] = {
        "images": n,
        "resolution": r,
        "unrelated_pairs": n * (n - 1) // 2,
        "trunk_and_decode_s_per_image": round(trunk_s, 4),
        "models": {},
    }
    bank: dict[str, Bank] = {}
    for model in MODELS:
        thr = store.model(model).threshold
        heads = engine.heads[model]
        flat = _flat(heads, feats)
        true = _all_pairs(flat)
        # the Gram path against the engine's own distance on a few pairs
        check = distance_from_features(heads, [f[:4] for f in feats], [f[4:8] for f in feats]).total
        gram = ((flat[:4] - flat[4:8]) ** 2).sum(1)
        assert float((check - gram).abs().max()) < 1e-4, (check, gram)
        fp = int((true <= thr).sum())
        out: dict[str, Any] = {
            "threshold": thr,
            "false_match_rate_per_pair": fp / true.size,
            "false_matches_per_search_10k_bank": 10_000 * fp / true.size,
            "threshold_at_rate_1e-4_per_pair": float(np.quantile(true, 1e-4)),
            "unrelated_distance_min_p1_p50": [
                float(true.min()),
                float(np.quantile(true, 0.01)),
                float(np.median(true)),
            ],
            "copies": {},
        }
        embs = {g: embed(heads, feats, g).numpy() for g in GRIDS}
        unrelated = {}
        for g, e in embs.items():
            b = _all_pairs(torch.from_numpy(e))
            unrelated[g] = np.sort(b)
            out[f"grid{g}"] = {
                "dimension": int(e.shape[1]),
                "survive_range_search": float((b <= thr).mean()),
                "bound_over_distance_median": float(np.median(b / true)),
            }
        bank[model] = Bank(thr, flat, embs, unrelated)
        report["models"][model] = out
        log.info("%s: unrelated pairs done", model)
    m = min(args.copies, n)
    for name, edit in EDITS.items():
        queries = [
            Image(load_tensor(edit(PILImage.open(io.BytesIO(b)).convert("RGB")), r), f"{name}{k}")
            for k, b in enumerate(raw[:m])
        ]
        if name.endswith("mirror"):  # the mirror option: the query's mirror searches too
            plain = _features(engine, queries)
            queries = [Image(q.tensor.flip(-1), q.key + ":m") for q in queries]
            qf = [plain, _features(engine, queries)]
        else:
            qf = [_features(engine, queries)]
        for model in MODELS:
            report["models"][model]["copies"][name] = _score(engine, model, bank[model], qf, m)
        log.info("%s done", name)
    del feats
    a = min(args.attacked, n)
    clean = torch.stack([load_tensor(b, r) for b in raw[:a]])
    for model in MODELS:  # PGD L∞ 8/255 against each model: push the copy away (evasion)
        metric = engine.metric(model)
        x, eps = to_unit(clean), 8 / 255

        def loss(x_adv: torch.Tensor, metric: Any = metric) -> torch.Tensor:
            return metric(clean, x_adv * 2 - 1)

        step = default_step_size("linf", eps, args.attack_steps)
        adv = pgd(loss, x, norm="linf", epsilon=eps, steps=args.attack_steps, step_size=step)
        adv = quantize(adv, x, "linf", eps)
        queries = [Image(t * 2 - 1, f"pgd{k}") for k, t in enumerate(adv.float())]
        report["models"][model]["copies"]["pgd_linf_8_255"] = _score(
            engine, model, bank[model], [_features(engine, queries)], a
        )
        log.info("%s: PGD done", model)
    report["load_average"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


@dataclass
class Bank:
    threshold: float
    flat: torch.Tensor
    embs: dict[int, np.ndarray]
    unrelated: dict[int, np.ndarray]


def _features(engine: Engine, imgs: list[Image]) -> list[torch.Tensor]:
    parts = [engine.image_features(MODELS[0], imgs[s : s + 16]) for s in range(0, len(imgs), 16)]
    return [torch.cat([b[layer] for b in parts]) for layer in range(len(parts[0]))]


def _score(
    engine: Engine, model: str, bank: Bank, variants: list[list[torch.Tensor]], m: int
) -> dict[str, Any]:
    """Copies of the first ``m`` bank images (each variant: the query, or its mirror too): caught by
    the exact distance, and expected within the first K by the bound at each bank size."""
    heads = engine.heads[model]
    thr = bank.threshold
    d = np.min(
        [((_flat(heads, qf) - bank.flat[:m]) ** 2).sum(1).numpy() for qf in variants], axis=0
    )
    caught = d <= thr
    out: dict[str, Any] = {
        "n": m,
        "caught_by_exact_distance": float(caught.mean()),
        "distance_median_p95_max": [
            float(np.median(d)),
            float(np.quantile(d, 0.95)),
            float(d.max()),
        ],
    }
    for g in GRIDS:
        b = np.min(
            [((embed(heads, qf, g).numpy() - bank.embs[g][:m]) ** 2).sum(1) for qf in variants],
            axis=0,
        )
        p_below = np.searchsorted(bank.unrelated[g], b) / bank.unrelated[g].size
        out[f"grid{g}"] = {
            str(size): {f"found@{k}": float((caught & (size * p_below < k)).mean()) for k in KS}
            for size in SIZES
        }
    return out


if __name__ == "__main__":
    main()
