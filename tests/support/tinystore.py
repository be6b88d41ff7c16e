"""A tiny model store with seeded random weights, for API tests whose assertions do not depend on real
LPIPS values: no ``../shared/weights`` needed, and nothing there can be mistaken for the real metric.

The store is written in the format of ``model_store/manifest.json`` (files named by their sha256, read
through :class:`app.metric.store.ModelStore` with all its checks), with:

- ``lpips-alex``: a random AlexNet trunk (torchvision ``features.N.*`` layout) and random non-negative
  heads (LPIPS ``lin{k}.model.1.weight`` layout). The name is the baseline that the API contract fixes
  (``/robustness-check`` attacks ``lpips-alex`` and the default model unless told otherwise), so the
  store must have a model of that name; here its weights are random.
- ``tiny-alex``: other random heads on the same trunk file (one trunk pass serves both); the manifest's
  default, like the shipped heads-only robust model of the real store.
- ``tiny-squeeze``: a random SqueezeNet 1.1 trunk (seven tapped layers) with its own heads.
- ``tiny-vgg``: listed, with its heads present but its trunk file absent (like ``lpips-vgg`` offline).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from app.metric.store import ModelStore, file_hashes
from app.metric.trunks import TRUNK_SPECS, Trunk, TrunkArch

BASELINE = "lpips-alex"
DEFAULT = "tiny-alex"
SQUEEZE = "tiny-squeeze"
MISSING = "tiny-vgg"
NAMES = [BASELINE, DEFAULT, SQUEEZE, MISSING]
THRESHOLD = 0.3
#: Heads are uniform in [0, HEAD_SCALE): a mean near the real LPIPS v0.1 heads' (0.04–0.18).
HEAD_SCALE = 0.2
#: sha256 listed for the absent VGG trunk (no file has it).
ABSENT_SHA256 = "0" * 64


def _trunk_state(arch: TrunkArch, seed: int) -> dict[str, torch.Tensor]:
    """torchvision's default initialisation of the ``features`` stack, seeded (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {k: v.clone() for k, v in Trunk(arch).state_dict().items()}


def _heads_state(arch: TrunkArch, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    channels = TRUNK_SPECS[arch].channels
    return {
        f"lin{k}.model.1.weight": torch.rand((1, c, 1, 1), generator=g) * HEAD_SCALE
        for k, c in enumerate(channels)
    }


def _file(filename: str, sha256: str, description: str) -> dict[str, Any]:
    return {
        "filename": filename,
        "url": None,
        "digests": [{"kind": "sha256", "value": sha256, "note": "random test weights"}],
        "license": "test data (random weights)",
        "description": description,
    }


def _model(arch: TrunkArch, trunk: str, heads: str, card: str) -> dict[str, Any]:
    return {
        "trunk": {"arch": arch, "file": trunk},
        "heads": heads,
        "variant": "random",
        "source": "tests/support/tinystore.py: seeded random weights, not a perceptual metric",
        "threshold": THRESHOLD,
        "card": card,
    }


def write_tiny_store(root: Path, seed: int = 0) -> Path:
    """Write the tiny store under ``root`` (created) and return ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    states: dict[str, tuple[str, dict[str, torch.Tensor] | None, str]] = {
        "tiny-alexnet": ("tiny-alexnet-features.pth", _trunk_state("alex", seed), "AlexNet trunk"),
        "tiny-squeezenet": (
            "tiny-squeezenet1_1-features.pth",
            _trunk_state("squeeze", seed + 1),
            "SqueezeNet 1.1 trunk",
        ),
        "tiny-vgg16": ("tiny-vgg16-features.pth", None, "VGG16 trunk (absent on purpose)"),
        "tiny-alex-heads-a": ("tiny-alex-heads-a.pth", _heads_state("alex", seed + 2), "heads"),
        "tiny-alex-heads-b": ("tiny-alex-heads-b.pth", _heads_state("alex", seed + 3), "heads"),
        "tiny-squeeze-heads": (
            "tiny-squeeze-heads.pth",
            _heads_state("squeeze", seed + 4),
            "heads",
        ),
        "tiny-vgg-heads": ("tiny-vgg-heads.pth", _heads_state("vgg", seed + 5), "heads"),
    }
    files: dict[str, dict[str, Any]] = {}
    for file_id, (filename, state, description) in states.items():
        sha = ABSENT_SHA256
        if state is not None:
            torch.save(state, root / filename)
            sha = file_hashes(root / filename)[0]
        files[file_id] = _file(filename, sha, f"random {description}")
    models = {
        BASELINE: _model("alex", "tiny-alexnet", "tiny-alex-heads-a", "cards/tiny.md"),
        DEFAULT: _model("alex", "tiny-alexnet", "tiny-alex-heads-b", "cards/tiny.md"),
        SQUEEZE: _model("squeeze", "tiny-squeezenet", "tiny-squeeze-heads", "cards/tiny.md"),
        MISSING: _model("vgg", "tiny-vgg16", "tiny-vgg-heads", "cards/tiny.md"),
    }
    manifest = {"format": 1, "default": DEFAULT, "files": files, "models": models}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (root / "cards").mkdir(exist_ok=True)
    (root / "cards" / "tiny.md").write_text(
        "# tiny test models\n\nSeeded random weights written by tests/support/tinystore.py.\n"
    )
    ModelStore(root)  # the manifest validates
    return root
