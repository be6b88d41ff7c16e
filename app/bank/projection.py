"""A model's bank projection: the top principal directions of its mean-and-spread statistics
(:func:`app.bank.embedding.statistics`), fitted once on training images and stored as a small
safetensors file that the model store names (``bank_projection`` of a model entry).

Any matrix with orthonormal rows keeps the statistics' lower bound (``‖P v‖ ≤ ‖v‖``), so the fit only
decides how tight the bound is, never whether it holds. The file keeps the basis in float16; loading
re-orthonormalises it (QR in float64 on the CPU, deterministic), so the bound holds for the basis
actually used, whatever the rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from app.bank.embedding import project, statistics
from app.imaging import load_tensor
from app.metric.engine import Engine
from app.metric.lpips import Heads
from app.metric.queries import Image
from app.metric.store import file_hashes

log = logging.getLogger(__name__)

#: Per-layer grids of the AlexNet statistics: conv1 carries most of R-LPIPS's weight and gains most
#: from a finer grid (docs/BANK.md, "Means and spreads"; 9,856 statistics).
ALEX_GRIDS = (6, 3, 1, 1, 1)


@dataclass(frozen=True)
class Projection:
    """``basis`` ``[k, D]`` float32 with orthonormal rows over the statistics at ``grids``; ``digest``:
    sha256 of its file (a bank records it, so a refitted projection cannot mix embeddings)."""

    grids: tuple[int, ...]
    basis: Tensor
    digest: str

    @property
    def key(self) -> str:
        """The bank embedding this projection makes (stored in each bank's settings)."""
        return f"projected:{self.digest[:12]}"

    def embed(self, heads: Heads, features: Sequence[Tensor]) -> Tensor:
        """``[N, k]`` float32 lower-bound embeddings of normalised features."""
        return project(self.basis, heads, features, self.grids)


def orthonormal(basis: Tensor) -> Tensor:
    """``[k, D]`` float32 with orthonormal rows spanning the rows of ``basis`` (``k ≤ D``)."""
    q, _ = torch.linalg.qr(basis.detach().cpu().double().T)
    out: Tensor = q.T.float().contiguous()
    return out


def fit(samples: Tensor, components: int) -> Tensor:
    """The ``components`` top principal directions ``[k, D]`` of statistics ``samples`` ``[M, D]``."""
    if components > min(samples.shape):
        raise ValueError(f"{components} components need more than {min(samples.shape)} samples")
    x = samples.double() - samples.double().mean(0)
    _, _, vt = torch.linalg.svd(x, full_matrices=False)
    out: Tensor = vt[:components].float().contiguous()
    return out


def fit_model(
    engine: Engine,
    model: str,
    files: Sequence[Path],
    components: int,
    grids: Sequence[int] = ALEX_GRIDS,
    batch: int = 16,
) -> Tensor:
    """Fit a projection for ``model`` on image ``files`` at the engine's working resolution."""
    heads = engine.heads[model]
    samples = []
    for s in range(0, len(files), batch):
        imgs = [
            Image(load_tensor(f.read_bytes(), engine.resolution), f.name)
            for f in files[s : s + batch]
        ]
        with torch.inference_mode():
            feats = engine.image_features(model, imgs, cache=False)
            samples.append(statistics(heads, feats, grids).cpu())
        log.info("projection fit: %d/%d images", min(s + batch, len(files)), len(files))
    return fit(torch.cat(samples), components)


def save(path: Path, basis: Tensor, grids: Sequence[int], note: str) -> None:
    save_file(
        {"basis": basis.half().contiguous(), "grids": torch.tensor(list(grids), dtype=torch.int64)},
        str(path),
        # one entry: safetensors writes a metadata map in no fixed order, and the bytes must repeat
        metadata={"rlpips-bank-projection-1": note},
    )


def load(path: Path) -> Projection:
    """The projection in ``path`` (as :func:`save` writes it), orthonormalised."""
    tensors = load_file(str(path))
    basis, grids = tensors.get("basis"), tensors.get("grids")
    if basis is None or grids is None or basis.ndim != 2 or basis.shape[0] > basis.shape[1]:
        raise ValueError(f"{path}: not a bank projection (needs basis [k, D], k <= D, and grids)")
    sha, _ = file_hashes(path)
    return Projection(tuple(int(g) for g in grids.tolist()), orthonormal(basis), sha)
