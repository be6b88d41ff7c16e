"""System tools and generated files some tests need (``.ci/run`` installs them, ``make test`` fits the
bank projection): found, or the test fails under ``CI=true`` and skips elsewhere (with the reason)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

from app.bank.projection import Projection, load
from app.metric.store import ModelStore

DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")


def missing(message: str) -> NoReturn:
    """Fail under ``CI=true`` (the tool should have been installed), skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def system_tool(name: str, package: str) -> str:
    """The path of command ``name`` (Debian package ``package``), on ``PATH`` or in the usual dirs."""
    found = shutil.which(name) or next(
        (p for p in (f"{d}/{name}" for d in DIRS) if Path(p).is_file()), None
    )
    if found is None:
        missing(f"{name} is not installed (Debian package {package}; .ci/run installs it)")
    return found


def shipped_projection(model: str = "r-lpips-alex-linf-synth") -> Projection:
    """``model``'s bank projection in the repository's store (``make projection`` fits it into
    model_store/files/, outside git)."""
    store = ModelStore()
    file_id = store.model(model).bank_projection
    assert file_id is not None
    status = store.status(file_id)
    if status.path is None:
        missing(f"the bank projection is not fitted ({status.problem}): run `make projection`")
    return load(status.path)
