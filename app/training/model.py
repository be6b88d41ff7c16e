"""What 2AFC training optimises: a metric (trunk + heads) and LPIPS' ranking network ``G(d0, d1)``.

``G`` maps the two distances of a triplet to the probability that ``p1`` is the closer patch, from the
features ``[d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)]`` (Zhang et al. 2018); the loss is the binary
cross-entropy of ``G`` against the judgment ``h``. Images enter as ``[N, 3, H, W]`` in ``[0, 1]`` pixel
units (the attack's convention) and are mapped to the metric's ``[-1, 1]`` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.imaging import to_signed
from app.metric.loaders import head_weights, read_state, trunk_state
from app.metric.lpips import LPIPS, Heads, distance_from_features
from app.metric.store import BASELINE_MODEL, ModelStore
from app.metric.trunks import Trunk, build_trunk

Mode = Literal["heads", "tune"]
EPS = 0.1


class RankNet(nn.Module):
    """LPIPS' ``Dist2LogitLayer``: 5 → 32 → 32 → 1 with leaky ReLUs; returns logits ``[N]``."""

    def __init__(self, mid: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, mid), nn.LeakyReLU(0.2), nn.Linear(mid, mid), nn.LeakyReLU(0.2),
            nn.Linear(mid, 1),
        )  # fmt: skip

    def forward(self, d0: Tensor, d1: Tensor) -> Tensor:
        """``d0``, ``d1``: distances ``[N]`` (≥ 0) → logit ``[N]`` of "p1 is closer"."""
        x = torch.stack([d0, d1, d0 - d1, d0 / (d1 + EPS), d1 / (d0 + EPS)], dim=1)
        out: Tensor = self.net(x).squeeze(1)
        return out


def random_heads(channels: Sequence[int], generator: torch.Generator) -> Heads:
    """Heads ``|U(-1/√C, 1/√C)|`` per layer: PyTorch's default 1×1 conv init, made non-negative."""
    return Heads(
        [(torch.rand(1, c, 1, 1, generator=generator) * 2 - 1).abs() / c**0.5 for c in channels]
    )


class TwoAFCModel(nn.Module):
    """Trainable metric + ranking network. ``mode='heads'`` trains heads and ``G`` on a frozen trunk,
    ``'tune'`` also the trunk (which stays in eval mode: AlexNet has no dropout/batch-norm in its features).
    """

    def __init__(self, trunk: Trunk, heads: Heads, mode: Mode = "heads") -> None:
        super().__init__()
        self.metric = LPIPS(trunk, heads)
        self.rank = RankNet()
        self.mode = mode
        for w in heads.weights:
            w.requires_grad_(True)
        if mode == "tune":
            trunk.unfreeze()

    def features(self, x: Tensor) -> list[Tensor]:
        """Normalised float32 features of ``x`` ``[N, 3, H, W]`` in ``[0, 1]``."""
        return self.metric.features(to_signed(x))

    def distance(self, fa: Sequence[Tensor], fb: Sequence[Tensor]) -> Tensor:
        """Distances ``[N]`` between two normalised feature lists."""
        return distance_from_features(self.metric.heads, fa, fb).total

    def loss(self, d0: Tensor, d1: Tensor, h: Tensor) -> Tensor:
        """Per-sample BCE ``[N]`` of ``G(d0, d1)`` against the judgment ``h`` in ``[0, 1]``."""
        return F.binary_cross_entropy_with_logits(self.rank(d0, d1), h, reduction="none")

    def triplet_loss(
        self, ref: Tensor, p0: Tensor, p1: Tensor, h: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss [N], d0 [N], d1 [N])`` for a batch of images in ``[0, 1]`` (one trunk pass)."""
        n = ref.shape[0]
        feats = self.features(torch.cat([ref, p0, p1]))
        fr, f0, f1 = ([f[k * n : (k + 1) * n] for f in feats] for k in range(3))
        d0, d1 = self.distance(fr, f0), self.distance(fr, f1)
        return self.loss(d0, d1, h), d0, d1

    def clamp_(self) -> None:
        """Keep the heads non-negative (after every optimiser step)."""
        self.metric.heads.clamp_()


def two_afc_score(d0: Tensor, d1: Tensor, h: Tensor) -> Tensor:
    """Per-triplet 2AFC score ``[N]``: ``h`` when the metric picks p1, ``1 - h`` for p0, 0.5 on a tie."""
    return torch.where(d1 < d0, h, torch.where(d0 < d1, 1 - h, torch.full_like(h, 0.5)))


def load_metric(spec: str, store: ModelStore) -> LPIPS:
    """A store model by name, or a bundle/checkpoint path (its trunk, else the AlexNet trunk)."""
    if spec in store.names:
        return store.load(spec)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"{spec!r} is neither a model in the store ({', '.join(store.names)}) nor a file"
        )
    state = read_state(path)
    if any(k.startswith(("trunk.", "net.", "features.")) for k in state):
        trunk = build_trunk("alex", trunk_state(state, path.name))
    else:
        trunk = store.load_trunk(BASELINE_MODEL)
    return LPIPS(trunk, Heads(head_weights(state, path.name)))
