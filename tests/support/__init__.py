"""Helpers shared by the test layers (no tests here): paths, API and server helpers, hostile images,
and the tiny random-weight model store."""

from __future__ import annotations

from pathlib import Path

#: The repository root and the offline data beside it (``../shared``: weights, golden pairs, images).
ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
IMAGES = SHARED / "images"
IMAGENET = IMAGES / "imagenet-sample"
KODAK = IMAGES / "kodak24"
