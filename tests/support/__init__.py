"""Helpers shared by the test layers (no tests here): paths, API and server helpers, hostile images,
and the tiny random-weight model store."""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root and the offline data beside it (``../shared``: weights, golden pairs, images;
#: ``RLPIPS_SHARED_DIR`` points elsewhere, e.g. at the bundle ``make gpu-check`` carries).
ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("RLPIPS_SHARED_DIR") or ROOT.parent / "shared")
IMAGES = SHARED / "images"
IMAGENET = IMAGES / "imagenet-sample"
KODAK = IMAGES / "kodak24"
