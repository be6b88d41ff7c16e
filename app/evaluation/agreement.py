"""Rank agreement between measures over clean distortion pairs, and per-layer shares of the distance.

Spearman's rank correlation of each model's distances with LPIPS-alex (whose heads were fitted to
BAPPS human judgments: the available proxy for perceptual agreement), with pixel L2 and with 1 − SSIM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor

from app.evaluation.scorers import Scorer, encode


def pixel_l2(a: Tensor, b: Tensor) -> Tensor:
    """Root-mean-square pixel difference ``[N]`` of images in [0, 1]."""
    return (a - b).pow(2).flatten(1).mean(dim=1).sqrt()


def ssim(a: Tensor, b: Tensor, sigma: float = 1.5) -> Tensor:
    """Mean SSIM ``[N]`` (Wang et al. 2004: Gaussian window σ = 1.5, 11 taps, K1 0.01, K2 0.03, data
    range 1) per channel, averaged over channels, of images ``[N, 3, H, W]`` in [0, 1]."""
    r = 5
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = (k / k.sum()).to(a)
    c = a.shape[1]
    kx = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(x, kx, groups=c), ky, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    va = blur(a * a) - mu_a**2
    vb = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(dim=1)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's ρ of two score vectors (NaN when either is constant)."""
    rho = spearmanr(a.double().numpy(), b.double().numpy()).statistic
    return float(rho) if rho is not None and math.isfinite(float(rho)) else float("nan")


def pair_distances(scorer: Scorer, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(distances [N], per-layer [N, L] or None)`` for pairs ``(x[i], y[i])``."""
    fx, fy = encode(scorer, x), encode(scorer, y)
    with torch.no_grad():
        return scorer.distance(fx, fy).double(), scorer.per_layer(fx, fy)


def layer_shares(per_layer: Tensor) -> list[float]:
    """Mean over pairs of each layer's share ``d_l / d`` of the distance (pairs with ``d > 0``)."""
    tot = per_layer.sum(dim=1, keepdim=True)
    ok = tot.squeeze(1) > 0
    return [float(v) for v in (per_layer[ok] / tot[ok]).mean(dim=0)]
