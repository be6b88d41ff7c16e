"""One interface over the compared methods: LPIPS-family metrics and the PDQ perceptual hash.

A :class:`Scorer` maps images ``[N, 3, H, W]`` in ``[0, 1]`` to *features* once, and features of two
batches to distances ``[N]`` (row by row), so fixed images are encoded once and an attack only re-encodes
the image it changes. ``pairwise`` gives all-pairs distances from features (the fast path of the
false-match measurement: see :func:`lpips_pairwise`). Smaller distance = more similar; a pair *matches*
when ``d <= threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from app.imaging import to_signed
from app.metric.lpips import LPIPS, distance_from_features

#: PDQ's customary match threshold (Hamming distance ≤ 31 of 256 bits; Meta's ThreatExchange docs).
PDQ_THRESHOLD = 31.0
PDQ = "pdq"


class Scorer(Protocol):
    name: str
    threshold: float
    differentiable: bool

    def features(self, x: Tensor) -> list[Tensor]:
        """Features of ``x`` ``[N, 3, H, W]`` in ``[0, 1]``: tensors whose first axis is ``N``."""
        ...

    def distance(self, fa: Sequence[Tensor], fb: Sequence[Tensor]) -> Tensor:
        """Distances ``[N]`` between rows of two feature lists."""
        ...

    def per_layer(self, fa: Sequence[Tensor], fb: Sequence[Tensor]) -> Tensor | None:
        """Per-layer distances ``[N, L]`` (summing to :meth:`distance`), or ``None``."""
        ...


def select(f: Sequence[Tensor], idx: Tensor) -> list[Tensor]:
    """Rows ``idx`` of every tensor of a feature list."""
    return [t[idx] for t in f]


def concat(parts: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Concatenate feature lists along the batch axis."""
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


@dataclass
class LPIPSScorer:
    """An LPIPS / R-LPIPS metric; features are the normalised trunk activations (float32)."""

    name: str
    metric: LPIPS
    threshold: float
    differentiable: bool = True

    def features(self, x: Tensor) -> list[Tensor]:
        return self.metric.features(to_signed(x))

    def distance(self, fa: Sequence[Tensor], fb: Sequence[Tensor]) -> Tensor:
        return distance_from_features(self.metric.heads, fa, fb).total

    def per_layer(self, fa: Sequence[Tensor], fb: Sequence[Tensor]) -> Tensor | None:
        return distance_from_features(self.metric.heads, fa, fb).per_layer


def _pdq_bits(x: Tensor) -> Tensor:
    import pdqhash

    arr = (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rows = [pdqhash.compute(np.ascontiguousarray(a))[0] for a in arr]
    return torch.from_numpy(np.stack(rows).astype(np.float32)).to(x.device)


@dataclass
class PDQScorer:
    """Meta's PDQ hash (``pdqhash``) of the 8-bit rounded image; distance = Hamming distance of the
    256-bit hashes (0..256). No gradient: only black-box attacks apply."""

    name: str = PDQ
    threshold: float = PDQ_THRESHOLD
    differentiable: bool = False

    def features(self, x: Tensor) -> list[Tensor]:
        return [_pdq_bits(x)]

    def distance(self, fa: Sequence[Tensor], fb: Sequence[Tensor]) -> Tensor:
        return (fa[0] != fb[0]).float().sum(dim=1)

    def per_layer(self, fa: Sequence[Tensor], fb: Sequence[Tensor]) -> Tensor | None:
        return None


def encode(scorer: Scorer, x: Tensor, batch: int = 32, desc: str | None = None) -> list[Tensor]:
    """Features of ``x`` in batches, without autograd, on ``x``'s device (a progress bar with ``desc``)."""
    starts = tqdm(range(0, len(x), batch), desc=desc, disable=desc is None, leave=False)
    with torch.no_grad():
        return concat([scorer.features(x[i : i + batch]) for i in starts])


def lpips_pairwise(
    scorer: LPIPSScorer, f: Sequence[Tensor], block: int = 64, g: Sequence[Tensor] | None = None
) -> Tensor:
    """All-pairs distances ``[M, M]`` (float64) from cached normalised features; with ``g`` (another
    feature list of ``M'`` rows) the cross distances ``d(f_i, g_j)`` ``[M, M']`` instead.

    ``d(a, b) = Σ_l mean_hw Σ_c w_c (a − b)² = Σ_l (‖g_a‖² + ‖g_b‖² − 2 g_a·g_b) / (H_l W_l)`` with
    ``g = √w ⊙ f`` flattened: one Gram matrix per layer (float64 blocks), instead of M² trunk passes.
    """
    other = f if g is None else g
    out = torch.zeros(f[0].shape[0], other[0].shape[0], dtype=torch.float64)
    for fa, fb, w in zip(f, other, scorer.metric.heads.weights, strict=True):
        ga = (fa * w.detach().sqrt()).flatten(1).double()
        gb = (fb * w.detach().sqrt()).flatten(1).double()
        hw = fa.shape[2] * fa.shape[3]
        sa, sb = (ga * ga).sum(dim=1), (gb * gb).sum(dim=1)
        for i in range(0, len(ga), block):
            gram = ga[i : i + block] @ gb.T
            out[i : i + block] += (sa[i : i + block, None] + sb[None, :] - 2 * gram) / hw
    return out.clamp_min(0)


def pairwise(scorer: Scorer, f: Sequence[Tensor], g: Sequence[Tensor] | None = None) -> Tensor:
    """All-pairs distances ``[M, M]`` (float64) for any scorer (PDQ: exact Hamming via a Gram matrix);
    with ``g``, the cross distances ``d(f_i, g_j)``."""
    if isinstance(scorer, LPIPSScorer):
        return lpips_pairwise(scorer, f, g=g)
    a = f[0].double()
    b = a if g is None else g[0].double()
    return (a.sum(dim=1)[:, None] + b.sum(dim=1)[None, :] - 2 * a @ b.T).round()
