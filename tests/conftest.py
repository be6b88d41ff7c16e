"""Shared fixtures: the offline data (required: tests fail, never skip, without it), the repository's
store reading it, and the tiny random-weight store for API tests that need no real weights.

Layers: ``tests/unit`` (the library, no HTTP), ``tests/api`` (through the ASGI app), ``tests/e2e`` (real
``uvicorn`` processes; every test there is marked ``e2e``). Helpers live in ``tests/support``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from app.metric.store import ModelStore
from tests.support import SHARED
from tests.support.tinystore import write_tiny_store

E2E_DIR = Path(__file__).resolve().parent / "e2e"


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under ``tests/e2e`` carries the ``e2e`` marker (``-m "not e2e"`` leaves the layer
    out), also one whose module forgets its ``pytestmark``."""
    for item in items:
        if item.path.is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """A ``gpu`` test fails, never skips, without CUDA: they are deselected by default (``-m "not gpu"``
    in pyproject), so running one means a GPU was expected (``pytest -m gpu`` on a GPU machine)."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.fail(
            "a `gpu` test needs a CUDA device, and torch.cuda.is_available() is False here",
            pytrace=False,
        )


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


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a model store with seeded random weights (:mod:`tests.support.tinystore`): for
    API tests whose assertions do not depend on real LPIPS values; needs no offline weights."""
    return write_tiny_store(tmp_path_factory.mktemp("tiny-store"))
