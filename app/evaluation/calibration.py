"""Default near-duplicate thresholds at a stated false-match rate (issue 13 item 4).

A moderation check is judged first by how often it matches images that have nothing to do with each
other. So each model's default threshold is the largest one at which at most ``fmr`` (default 1e-5) of
the pairs of *unrelated* natural images match (``d <= threshold``):

- images: the 100 **val** sources of the training split (:func:`app.evaluation.data.calibration_files`):
  never trained on and never used by the evaluation suite, which reports the false-match rate at this
  threshold on its own held-out images (the 100 test sources and Kodak24); or every image of another
  folder (a deployment's own traffic);
- ``views`` per image (the whole image and windows of 75 % of each side at the corners), resized to the
  working resolution (256²) as the service does; every pair of views of *different* sources is a
  negative: 5 views give 123,750 pairs, so a rate of 1e-5 allows one false match;
- the threshold is just below the ``(⌊fmr · pairs⌋ + 1)``-th smallest unrelated distance, rounded down
  to 4 decimals (:func:`app.evaluation.neardup.threshold_at_fmr`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from app.evaluation.data import IMAGENET, calibration_files, crop_views
from app.evaluation.neardup import FMR_TARGET, negative_distances, threshold_at_fmr
from app.evaluation.scorers import LPIPSScorer

VIEWS = 5


def calibrate(
    scorer: LPIPSScorer,
    images: Path = IMAGENET,
    views: int = VIEWS,
    resolution: int = 256,
    fmr: float = FMR_TARGET,
) -> dict[str, Any]:
    """The threshold of ``scorer`` at false-match rate ``fmr`` and the measurements behind it (JSON)."""
    files = calibration_files(images)
    default = images.resolve() == IMAGENET.resolve()
    what = "ImageNet val-split sources" if default else f"images of {images}"
    x, groups = crop_views(files, resolution, views)
    neg = negative_distances(scorer, x, groups)  # float64
    threshold = math.floor(threshold_at_fmr(neg, fmr) * 1e4) / 1e4
    matches = int((neg <= threshold).sum())
    low = neg.sort().values
    return {
        "threshold": threshold,
        "false_match_rate": fmr,
        "false_matches": matches,
        "pairs": len(neg),
        "measured_rate": matches / len(neg),
        "images": f"{len(files)} {what} x {views} views at {resolution}x{resolution}",
        "smallest_unrelated": [round(float(v), 6) for v in low[:5]],
        "first_excluded": float(low[matches]),  # the smallest unrelated distance above it
        "median_unrelated": round(float(low[len(low) // 2]), 4),
    }


def manifest_entry(result: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``calibration`` block (:class:`app.metric.store.Calibration`) of a result."""
    keys = ("false_match_rate", "false_matches", "pairs", "images")
    return {k: result[k] for k in keys}
