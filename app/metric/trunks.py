"""Feature trunks (AlexNet, SqueezeNet 1.1, VGG16) with the LPIPS v0.1 scaling layer and taps.

A trunk maps images ``x`` of shape ``[N, 3, H, W]`` with values in ``[-1, 1]`` to a list of L
feature maps ``[N, C_l, H_l, W_l]`` taken after the ReLUs that LPIPS v0.1 taps. Parameters keep
torchvision's ``features.N.*`` names, so torchvision state dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision import models

TrunkArch = Literal["alex", "squeeze", "vgg"]

#: LPIPS v0.1 scaling layer: ``(x - SHIFT) / SCALE`` on ``[-1, 1]`` inputs.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


@dataclass(frozen=True)
class TrunkSpec:
    """Where LPIPS taps a torchvision ``features`` stack: the index of each tapped ReLU."""

    arch: TrunkArch
    taps: tuple[int, ...]
    channels: tuple[int, ...]


TRUNK_SPECS: dict[TrunkArch, TrunkSpec] = {
    "alex": TrunkSpec("alex", (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    "squeeze": TrunkSpec("squeeze", (1, 4, 7, 9, 10, 11, 12), (64, 128, 256, 384, 384, 512, 512)),
    "vgg": TrunkSpec("vgg", (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
}


def _features(arch: TrunkArch) -> nn.Sequential:
    """The torchvision ``features`` stack for ``arch``, randomly initialised (weights load later)."""
    net: nn.Module
    if arch == "alex":
        net = models.alexnet(weights=None)
    elif arch == "squeeze":
        net = models.squeezenet1_1(weights=None)
    else:
        net = models.vgg16(weights=None)
    features = net.features
    assert isinstance(features, nn.Sequential)
    return features


class Trunk(nn.Module):
    """Scaling layer + torchvision feature stack, cut after the last LPIPS tap.

    Always in eval mode with frozen parameters unless :meth:`unfreeze` is called (``tune`` training).
    """

    shift: Tensor
    scale: Tensor

    def __init__(self, arch: TrunkArch) -> None:
        super().__init__()
        self.spec = TRUNK_SPECS[arch]
        feats = _features(arch)
        self.features = nn.Sequential(*list(feats.children())[: self.spec.taps[-1] + 1])
        for m in self.features.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False  # taps must not be overwritten by the next layer
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @property
    def arch(self) -> TrunkArch:
        return self.spec.arch

    def freeze(self) -> None:
        """Eval mode, no gradients to parameters (gradients to inputs still flow)."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def unfreeze(self) -> None:
        """Make parameters trainable (the R-LPIPS ``tune`` mode); the module stays in eval mode."""
        for p in self.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> Trunk:
        """Eval-locked: dropout/batch-norm never switch to training behaviour."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x``: ``[N, 3, H, W]`` in ``[-1, 1]`` → L feature maps ``[N, C_l, H_l, W_l]``."""
        h = (x - self.shift) / self.scale
        taps = set(self.spec.taps)
        out: list[Tensor] = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in taps:
                out.append(h)
        return out

    def forward_pruned(self, x: Tensor, keep: Callable[[int, Tensor], Tensor]) -> Tensor:
        """Run ``x`` ``[N, 3, H, W]`` (in ``[-1, 1]``) tap by tap, dropping rows on the way: after tap
        ``l`` (raw feature map ``[n, C_l, H_l, W_l]`` of the ``n`` rows still running),
        ``keep(l, tap)`` answers a bool mask ``[n]`` of the rows to continue. Returns the indices
        ``[m]`` (into ``x``) of the rows kept after every tap."""
        h = (x - self.shift) / self.scale
        alive = torch.arange(x.shape[0], device=x.device)
        taps = set(self.spec.taps)
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in taps:
                mask = keep(tap, h)
                tap += 1
                alive, h = alive[mask], h[mask]
                if not len(alive):
                    break
        return alive


def build_trunk(arch: TrunkArch, state: dict[str, Tensor]) -> Trunk:
    """A trunk with ``state`` (torchvision ``features.N.*`` keys, strict) loaded.

    Raises ``ValueError`` naming missing/unexpected keys when the layout does not match ``arch``.
    """
    trunk = Trunk(arch)
    own = trunk.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{arch} trunk state does not match the architecture: "
            f"missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(
                f"{arch} trunk key {k}: shape {tuple(v.shape)}, want {tuple(own[k].shape)}"
            )
    trunk.load_state_dict(state, strict=True)
    return trunk
