"""LPIPS v0.1 distance as *one trunk + named heads*.

Images are ``[N, 3, H, W]`` float tensors in ``[-1, 1]``. Features are unit-normalised over channels in
float32, the squared difference is weighted per channel by non-negative 1×1 heads and averaged over space.
Several heads (LPIPS, heads-only R-LPIPS variants) can share one trunk pass via :meth:`LPIPS.features`
and :func:`distance_from_features`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.metric.trunks import Trunk

EPS = 1e-10


def check_images(x: Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a float ``[N, 3, H, W]`` tensor with values in ``[-1, 1]``."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3, H, W], got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [-1, 1], got dtype {x.dtype}")
    if x.numel() and (x.min() < -1.0001 or x.max() > 1.0001):
        lo, hi = float(x.min()), float(x.max())
        raise ValueError(f"{name} values must lie in [-1, 1], got [{lo:.4g}, {hi:.4g}]")


def normalize(f: Tensor) -> Tensor:
    """Unit-normalise ``[N, C, H, W]`` features over channels, computed in float32."""
    f = f.float()
    return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + EPS)


class Heads(nn.Module):
    """Non-negative 1×1 linear heads, one ``[1, C_l, 1, 1]`` weight per tapped layer."""

    def __init__(self, weights: Sequence[Tensor]) -> None:
        super().__init__()
        for k, w in enumerate(weights):
            if w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1):
                raise ValueError(f"head {k} must have shape [1, C, 1, 1], got {list(w.shape)}")
            if bool((w < 0).any()):
                raise ValueError(f"head {k} has negative weights (min {float(w.min()):.3g})")
        self.weights = nn.ParameterList(
            nn.Parameter(w.detach().float().clone(), requires_grad=False) for w in weights
        )

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(int(w.shape[1]) for w in self.weights)

    def clamp_(self) -> None:
        """Project onto the non-negative orthant (after each training step)."""
        with torch.no_grad():
            for w in self.weights:
                w.clamp_(min=0)

    def layer_maps(self, f0: Sequence[Tensor], f1: Sequence[Tensor]) -> list[Tensor]:
        """Per-layer distance maps ``[N, 1, H_l, W_l]`` from normalised features (float32)."""
        if len(f0) != len(self.weights) or len(f1) != len(self.weights):
            raise ValueError(
                f"expected {len(self.weights)} feature layers, got {len(f0)}/{len(f1)}"
            )
        return [F.conv2d((a - b) ** 2, w) for a, b, w in zip(f0, f1, self.weights, strict=True)]


@dataclass(frozen=True)
class DistanceResult:
    """``total`` ``[N]``; ``per_layer`` ``[N, L]``; ``spatial`` ``[N, 1, H, W]`` or ``None``."""

    total: Tensor
    per_layer: Tensor
    spatial: Tensor | None = None


def distance_from_features(
    heads: Heads,
    f0: Sequence[Tensor],
    f1: Sequence[Tensor],
    spatial_size: tuple[int, int] | None = None,
) -> DistanceResult:
    """Distances between rows of two normalised feature lists (see :meth:`LPIPS.features`).

    ``spatial_size`` ``(H, W)`` also returns the summed per-layer maps upsampled bilinearly to it.
    """
    maps = heads.layer_maps(f0, f1)
    per_layer = torch.stack([m.mean(dim=(1, 2, 3)) for m in maps], dim=1)
    spatial = None
    if spatial_size is not None:
        ups = [
            F.interpolate(m, size=spatial_size, mode="bilinear", align_corners=False) for m in maps
        ]
        spatial = torch.stack(ups).sum(dim=0)
    return DistanceResult(total=per_layer.sum(dim=1), per_layer=per_layer, spatial=spatial)


class LPIPS(nn.Module):
    """A differentiable LPIPS / R-LPIPS metric: a :class:`Trunk` and one set of :class:`Heads`.

    ``forward(x0, x1)`` returns distances ``[N]`` (float32, ≥ 0) for images in ``[-1, 1]``.
    """

    def __init__(self, trunk: Trunk, heads: Heads) -> None:
        super().__init__()
        if trunk.spec.channels != heads.channels:
            raise ValueError(
                f"heads with channels {heads.channels} do not fit the {trunk.arch} trunk "
                f"({trunk.spec.channels})"
            )
        self.trunk = trunk
        self.heads = heads
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Eval-locked (the trunk never leaves eval mode)."""
        return super().train(False)

    def features(self, x: Tensor) -> list[Tensor]:
        """Normalised float32 features of ``x`` (``[N, 3, H, W]`` in ``[-1, 1]``)."""
        return [normalize(f) for f in self.trunk(x)]

    def compare(self, x0: Tensor, x1: Tensor, spatial: bool = False) -> DistanceResult:
        """Full result for image pairs ``x0``, ``x1`` of equal shape ``[N, 3, H, W]`` in ``[-1, 1]``."""
        check_images(x0, "x0")
        check_images(x1, "x1")
        if x0.shape != x1.shape:
            raise ValueError(
                f"x0 and x1 must have the same shape, got {list(x0.shape)} and {list(x1.shape)}"
            )
        n = x0.shape[0]
        feats = self.features(torch.cat([x0, x1]))
        f0 = [f[:n] for f in feats]
        f1 = [f[n:] for f in feats]
        size = (int(x0.shape[2]), int(x0.shape[3])) if spatial else None
        return distance_from_features(self.heads, f0, f1, size)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        """Distances ``[N]`` between ``x0`` and ``x1`` (``[N, 3, H, W]`` in ``[-1, 1]``)."""
        return self.compare(x0, x1).total
