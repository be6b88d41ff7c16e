"""Near-duplicate threshold calibration: benign edits of an image vs pairs of different images.

Positives are an image and a benign edit of it (JPEG re-encoding, rescaling, a small crop, brightness,
slight blur); negatives are two different images. Both are compared at the working resolution. The
threshold maximises balanced accuracy (mean of the true-positive and true-negative rates).
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageEnhance, ImageFilter
from tqdm import tqdm

from app.imaging import decode, resize, to_tensor
from app.metric.store import ModelStore, WeightsError

log = logging.getLogger(__name__)

Edit = Callable[[Image.Image], Image.Image]


def jpeg_edit(quality: int) -> Edit:
    """Re-encode as JPEG at ``quality`` (a benign edit; also used by app.evaluation)."""

    def edit(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    return edit


def _rescale(factor: float) -> Edit:
    def edit(img: Image.Image) -> Image.Image:
        w, h = img.size
        small = img.resize(
            (max(1, int(w * factor)), max(1, int(h * factor))), Image.Resampling.BICUBIC
        )
        return small.resize((w, h), Image.Resampling.BICUBIC)

    return edit


def _crop(fraction: float) -> Edit:
    def edit(img: Image.Image) -> Image.Image:
        w, h = img.size
        dx, dy = int(w * fraction), int(h * fraction)
        return img.crop((dx, dy, w - dx, h - dy))

    return edit


BENIGN_EDITS: dict[str, Edit] = {
    "jpeg-q75": jpeg_edit(75),
    "jpeg-q40": jpeg_edit(40),
    "rescale-0.5": _rescale(0.5),
    "crop-4pct": _crop(0.04),
    "brightness+10pct": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "blur-r1": lambda im: im.filter(ImageFilter.GaussianBlur(1.0)),
}


def best_threshold(pos: torch.Tensor, neg: torch.Tensor) -> tuple[float, float, float]:
    """``(threshold, tpr, tnr)`` maximising balanced accuracy of ``d <= threshold``; pos/neg are ``[K]``."""
    candidates = torch.cat([pos, neg]).sort().values
    mids = (candidates[:-1] + candidates[1:]) / 2
    tpr = (pos[None, :] <= mids[:, None]).float().mean(dim=1)
    tnr = (neg[None, :] > mids[:, None]).float().mean(dim=1)
    i = int(torch.argmax(tpr + tnr))
    return float(mids[i]), float(tpr[i]), float(tnr[i])


def build_pairs(
    folder: Path, limit: int, resolution: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(x0, x1, kinds)``: ``[P, 3, R, R]`` image pairs in ``[-1, 1]``, edit name or ``"different"``."""
    paths = sorted(folder.glob("*.JPEG"))
    if len(paths) < 2:
        raise FileNotFoundError(f"need at least 2 images in {folder}")
    rng = random.Random(seed)
    paths = rng.sample(paths, min(limit, len(paths)))
    imgs = [decode(p.read_bytes()) for p in paths]
    x0, x1, kinds = [], [], []
    for i, img in enumerate(imgs):
        name = rng.choice(sorted(BENIGN_EDITS))
        other = imgs[(i + 1 + rng.randrange(len(imgs) - 1)) % len(imgs)]
        for second, kind in ((BENIGN_EDITS[name](img), name), (other, "different")):
            x0.append(to_tensor(resize(img, resolution)))
            x1.append(to_tensor(resize(second, resolution)))
            kinds.append(kind)
    return torch.stack(x0), torch.stack(x1), kinds


@torch.inference_mode()
def distances(
    store: ModelStore, name: str, x0: torch.Tensor, x1: torch.Tensor, batch: int = 32
) -> torch.Tensor:
    """Distances ``[P]`` of model ``name`` for pairs ``x0``, ``x1`` ``[P, 3, H, W]`` in ``[-1, 1]``."""
    metric = store.load(name)
    return torch.cat(
        [metric(x0[i : i + batch], x1[i : i + batch]) for i in range(0, len(x0), batch)]
    )


def calibrate(
    store: ModelStore, models: list[str], folder: Path, limit: int, resolution: int, seed: int
) -> dict[str, object]:
    """Per-model threshold, rates and distance summaries (JSON-ready)."""
    x0, x1, kinds = build_pairs(folder, limit, resolution, seed)
    is_pos = torch.tensor([k != "different" for k in kinds])
    out: dict[str, object] = {
        "images": limit,
        "resolution": resolution,
        "seed": seed,
        "edits": sorted(BENIGN_EDITS),
        "models": {},
    }
    results: dict[str, object] = {}
    for name in tqdm(models, desc="models"):
        try:
            d = distances(store, name, x0, x1)
        except WeightsError as exc:
            log.warning("skipping %s: %s", name, exc)
            results[name] = {"skipped": str(exc).split(".")[0]}
            continue
        thr, tpr, tnr = best_threshold(d[is_pos], d[~is_pos])
        per_edit = {
            k: round(float(d[[i for i, kk in enumerate(kinds) if kk == k]].max()), 4)
            for k in sorted(set(kinds) - {"different"})
        }
        results[name] = {
            "threshold": round(thr, 4),
            "tpr": tpr,
            "tnr": tnr,
            "positive_max_by_edit": per_edit,
            "negative_min": round(float(d[~is_pos].min()), 4),
            "negative_median": round(float(d[~is_pos].median()), 4),
        }
    out["models"] = results
    return out
