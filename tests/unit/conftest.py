"""Fixtures shared by the unit tests of the bank."""

from __future__ import annotations

import pytest
import torch

from app.metric.engine import Engine
from app.metric.store import ModelStore

#: The default (robust) model and lpips-alex: the bank tests check every bound with both.
BANK_MODELS = ["r-lpips-alex-linf-synth", "lpips-alex"]


@pytest.fixture(scope="module")
def bank_engine(store: ModelStore) -> Engine:
    """Both models on the CPU at 64², loaded."""
    eng = Engine(store, BANK_MODELS, torch.device("cpu"), 64)
    eng.load()
    return eng
