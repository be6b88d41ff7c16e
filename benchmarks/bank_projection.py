"""Choosing the bank projection: for each candidate (per-layer statistics grids, number of directions),
fit it on the train + val images as ``rlpips evaluate bank-projection`` does, then measure on the bank
of all 1,000 sample images what ``benchmarks/bank_metric.py`` measures for the default model — the share
of unrelated pairs that survive the range search, the median bound / distance, and found@K at 100,000
items for copies of the test-split images (blur, brightness, overlay; PGD L∞ 8/255 against the distance
on 20 of them).

    nice -n 5 python -m benchmarks.bank_projection --out docs/benchmarks/bank_projection.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from app.attacks.pgd import default_step_size, pgd, quantize
from app.bank.projection import Projection, fit_model, orthonormal
from app.config import Settings
from app.evaluation.data import TRAIN_FRACTIONS, TRAIN_SEED, training_files
from app.imaging import load_tensor, to_unit
from app.metric.engine import Engine
from app.metric.queries import Image
from app.training.datasets import split_sources
from benchmarks.bank_metric import EDITS, MODELS, _features, _flat, _squared
from benchmarks.loadgen import IMAGENET

log = logging.getLogger("benchmarks.bank_projection")
VARIANTS = "4,2,1,1,1:256,512;6,2,1,1,1:256;6,3,1,1,1:256,320,512;8,2,1,1,1:256;8,3,1,1,1:256"


def _variants(text: str) -> list[tuple[tuple[int, ...], list[int]]]:
    out = []
    for part in text.split(";"):
        grids, ks = part.split(":")
        out.append((tuple(int(g) for g in grids.split(",")), [int(k) for k in ks.split(",")]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=VARIANTS, help="GRIDS:K,K;... (grids per layer)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    model = MODELS[0]
    store = Settings().store()
    engine = Engine(store, [model], torch.device("cpu"), 256)
    engine.load()
    heads, thr = engine.heads[model], store.model(model).threshold
    projections: dict[str, Projection] = {}
    for grids, ks in _variants(args.variants):
        basis = fit_model(engine, model, training_files(IMAGENET), max(ks), grids)
        for k in ks:
            projections[f"{grids} k={k}"] = Projection(grids, orthonormal(basis[:k]), "")
    files = sorted(IMAGENET.glob("*.JPEG"))
    test = split_sources(len(files), TRAIN_SEED, TRAIN_FRACTIONS)["test"]
    raw = [f.read_bytes() for f in files]
    feats = _features(
        engine, [Image(load_tensor(b, 256), f.name) for b, f in zip(raw, files, strict=True)]
    )
    flat = _flat(heads, feats)
    true_m = _squared(flat).double().numpy()
    iu = np.triu_indices(len(files), 1)
    other = np.ones((len(test), len(files)), dtype=bool)
    other[np.arange(len(test)), np.array(test)] = False
    copies: dict[str, tuple[list[torch.Tensor], list[int]]] = {}
    for name in ("blur_r2", "brightness_1.2", "overlay"):
        imgs = [PILImage.open(io.BytesIO(raw[i])).convert("RGB") for i in test]
        queries = [
            Image(load_tensor(EDITS[name](im), 256), f"{name}{k}") for k, im in enumerate(imgs)
        ]
        copies[name] = (_features(engine, queries), test)
    attacked = test[:20]
    clean = torch.stack([load_tensor(raw[i], 256) for i in attacked])
    metric, x, eps = engine.metric(model), to_unit(clean), 8 / 255
    adv = pgd(lambda a: metric(clean, a * 2 - 1), x, norm="linf", epsilon=eps, steps=10,
              step_size=default_step_size("linf", eps, 10))  # fmt: skip
    adv = quantize(adv, x, "linf", eps)
    queries = [Image(t * 2 - 1, f"pgd{k}") for k, t in enumerate(adv.float())]
    copies["pgd_linf_8_255"] = (_features(engine, queries), attacked)
    caught = {
        n: ((_flat(heads, qf) - flat[torch.tensor(o)]) ** 2).sum(1).numpy() <= thr
        for n, (qf, o) in copies.items()
    }
    report: dict[str, Any] = {"model": model, "threshold": thr, "variants": {}}
    for key, proj in projections.items():
        e = proj.embed(heads, feats)
        b_m = _squared(e.double()).numpy()
        unrelated = np.sort(b_m[np.array(test)][other])
        row: dict[str, Any] = {
            "dimension": int(e.shape[1]),
            "statistics": int(proj.basis.shape[1]),
            "survive_range_search": float((b_m[iu] <= thr).mean()),
            "bound_over_distance_median": float(np.median(b_m[iu] / true_m[iu])),
        }
        for n, (qf, o) in copies.items():
            b = ((proj.embed(heads, qf) - e[torch.tensor(o)]) ** 2).sum(1).numpy()
            p_below = np.searchsorted(unrelated, b) / unrelated.size
            row[n] = {
                f"found@{k}": float((caught[n] & (1e5 * p_below < k)).mean()) for k in (16, 24, 32)
            }
        report["variants"][key] = row
        log.info("%s: %s", key, row)
    report["load_average"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
