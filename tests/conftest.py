"""Shared fixtures: the offline weights folder (required: tests fail, never skip, without it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.metric.store import ModelStore

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _weights_dir() -> Path:
    env = os.environ.get("RLPIPS_WEIGHTS_DIR")
    path = Path(env) if env else SHARED / "weights"
    if not (path / "alexnet-features.pth").is_file():
        pytest.fail(
            f"offline weights not found in {path}: set RLPIPS_WEIGHTS_DIR to the folder holding "
            "../shared/weights (see README)"
        )
    return path


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    return _weights_dir()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    path = SHARED / "golden"
    if not (path / "expected.json").is_file():
        pytest.fail(f"golden values not found in {path}")
    return path


@pytest.fixture(scope="session")
def images_dir() -> Path:
    path = SHARED / "images"
    if not (path / "kodak24").is_dir():
        pytest.fail(f"sample images not found in {path}")
    return path


@pytest.fixture(scope="session")
def store(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """The repository's store, reading weights from the offline folder; downloads go to a temp dir."""
    return ModelStore(weights_dir=weights_dir, cache_dir=tmp_path_factory.mktemp("store-cache"))
