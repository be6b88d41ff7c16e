"""A fixed-length embedding whose squared L2 distance is a lower bound of the LPIPS distance.

LPIPS (``app.metric.lpips``): for normalised features ``f̂`` ``[C_l, H_l, W_l]`` of layer ``l`` and the
non-negative 1×1 head ``w_l`` ``[C_l]``, ``d(x, y) = Σ_l (1 / H_l W_l) Σ_hw Σ_c w_lc (f̂x − f̂y)²``.
With ``g = sqrt(w_l) ⊙ f̂`` this is ``Σ_l (1 / H_l W_l) Σ_hw ‖g_x(h, w) − g_y(h, w)‖²``. Split each
layer's map into a coarse grid of cells ``k`` (``A_k`` positions each; cells may be unequal when the
grid does not divide the map). By Jensen (Cauchy-Schwarz) per cell, ``Σ_{hw ∈ k} ‖d(h, w)‖² ≥
A_k ‖mean_k d‖²``, hence

    d(x, y) ≥ Σ_l Σ_k ‖e_lk(x) − e_lk(y)‖²  with  e_lk = sqrt(A_k / H_l W_l) · mean_k(sqrt(w_l) ⊙ f̂).

The embedding is the concatenation of every ``e_lk``: ``Σ_l C_l · g_h(l) · g_w(l)`` float32 values,
where ``g_h(l) = min(grid, H_l)`` (a grid finer than the map would leave cells empty). A range search
with radius = threshold over these vectors therefore keeps every pair whose true distance is under
the threshold (no false dismissals); :data:`SLACK` covers float rounding of the two computations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from app.metric.lpips import Heads

#: Relative and absolute slack added to a search radius: the bound holds exactly in real arithmetic;
#: float32 rounding of the features and of the two sums moves either side by ~1e-6.
SLACK_REL = 1e-4
SLACK_ABS = 1e-5


def radius(threshold: float) -> float:
    """The range-search radius (squared L2) that keeps every item with distance ≤ ``threshold``."""
    return threshold * (1 + SLACK_REL) + SLACK_ABS


def _cells(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, nearly equal ``[start, stop)`` ranges covering ``range(n)``."""
    k = min(parts, n)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def dimension(heads: Heads, shapes: Sequence[tuple[int, int]], grid: int) -> int:
    """Embedding length for feature maps of spatial ``shapes`` ``(H_l, W_l)``."""
    return sum(
        c * len(_cells(h, grid)) * len(_cells(w, grid))
        for c, (h, w) in zip(heads.channels, shapes, strict=True)
    )


def embed(heads: Heads, features: Sequence[Tensor], grid: int) -> Tensor:
    """Embeddings ``[N, D]`` float32 of normalised features (each ``[N, C_l, H_l, W_l]``, float32, unit
    norm over channels, as :func:`app.metric.lpips.normalize` makes them) under ``heads``."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    parts: list[Tensor] = []
    for f, w in zip(features, heads.weights, strict=True):
        g = f.float() * w.detach().float().sqrt()  # [N, C, H, W] · [1, C, 1, 1]
        h, wd = int(g.shape[2]), int(g.shape[3])
        for r0, r1 in _cells(h, grid):
            for c0, c1 in _cells(wd, grid):
                area = (r1 - r0) * (c1 - c0)
                cell = g[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
                parts.append(cell * (area / (h * wd)) ** 0.5)
    return torch.cat(parts, dim=1).contiguous()


# -- projected mean-and-spread statistics --------------------------------------------------------
#
# Within one cell ``k`` and channel ``c`` the positions' values split into their mean and the
# residuals ``r``: ``Σ_{hw ∈ k} (g_x − g_y)² = A_k (μ_x − μ_y)² + ‖r_x − r_y‖²`` and, by the triangle
# inequality, ``‖r_x − r_y‖ ≥ |‖r_x‖ − ‖r_y‖| = sqrt(A_k) |σ_x − σ_y|`` (σ: the population standard
# deviation over the cell). So appending ``sqrt(A_k / H_l W_l) · σ`` to each cell mean keeps the lower
# bound and tightens it: a channel's spatial spread (edge energy, for conv1) differs between unrelated
# images even where its mean does not. Any matrix with orthonormal rows ``P`` (``‖P v‖ ≤ ‖v‖``) then
# gives a shorter vector whose squared distance is still a lower bound; :mod:`app.bank.projection` fits
# ``P`` by PCA so that the few kept directions carry most of the statistics' spread.


def statistics(heads: Heads, features: Sequence[Tensor], grids: Sequence[int]) -> Tensor:
    """``[N, D]`` float32: per layer ``l`` (grid ``grids[l]``), per cell, ``sqrt(A_k / H_l W_l)`` times
    the per-channel mean and then the per-channel standard deviation of ``sqrt(w_l) ⊙ f̂``;
    ``‖s_x − s_y‖² ≤ d(x, y)`` (features as for :func:`embed`)."""
    if len(grids) != len(heads.channels) or min(grids) < 1:
        raise ValueError(f"need one grid >= 1 per layer ({len(heads.channels)}), got {grids}")
    parts: list[Tensor] = []
    for f, w, grid in zip(features, heads.weights, grids, strict=True):
        g = f.float() * w.detach().float().sqrt()
        h, wd = int(g.shape[2]), int(g.shape[3])
        means, spreads = [], []
        for r0, r1 in _cells(h, grid):
            for c0, c1 in _cells(wd, grid):
                scale = ((r1 - r0) * (c1 - c0) / (h * wd)) ** 0.5
                cell = g[:, :, r0:r1, c0:c1].flatten(2)  # [N, C, A_k]
                means.append(cell.mean(2) * scale)
                spreads.append(cell.std(2, correction=0) * scale)
        parts += means + spreads
    return torch.cat(parts, dim=1).contiguous()


def project(
    basis: Tensor, heads: Heads, features: Sequence[Tensor], grids: Sequence[int]
) -> Tensor:
    """``[N, k]`` float32: :func:`statistics` projected on ``basis`` ``[k, D]`` (orthonormal rows), a
    lower-bound embedding like :func:`embed`."""
    s = statistics(heads, features, grids)
    if s.shape[1] != basis.shape[1]:
        raise ValueError(
            f"statistics have {s.shape[1]} values, the projection expects {basis.shape[1]}: "
            "feature maps smaller than its grids (working resolution too low)"
        )
    return (s @ basis.to(s.device).T).contiguous()
