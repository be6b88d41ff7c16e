"""The bank's exact stage, pruned layer by layer.

LPIPS is a sum over layers of non-negative terms, so after each layer of the trunk the partial sum is
a lower bound of the distance: an item whose partial sum already exceeds the threshold cannot match
and its trunk pass stops there. R-LPIPS puts most of an unrelated pair's distance in conv1 (median
0.44 of 0.50 at 256², docs/BANK.md), so almost every unrelated item stops after conv1, about a tenth
of a trunk pass. The items that pass every layer are the possible matches; their distance then comes
from :meth:`Engine.compute`, the code path of ``/distance``, so a returned distance is the number
``/distance`` gives for the pair. Nothing is approximated: a pruned item's distance is above the
threshold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from app.bank.embedding import radius
from app.metric.engine import Engine
from app.metric.lpips import normalize

#: Relative slack of the pruning test under float16/bfloat16 autocast (the partial sums and the final
#: distances then round differently by ~1e-3); float32 uses the embedding's radius slack.
LOW_PRECISION_SLACK = 1e-2


def possible_matches(
    engine: Engine,
    model: str,
    queries: Sequence[Sequence[Tensor]],
    items: Sequence[Tensor],
    threshold: float,
) -> Tensor:
    """Indices ``[m]`` of ``items`` (each ``[3, H, W]`` in ``[-1, 1]``) whose distance to at least one
    of ``queries`` (normalised features, one ``[1, C_l, H_l, W_l]`` list per query variant, on the
    engine's device) may be ``≤ threshold``; every other item is farther than ``threshold`` from all of
    them. Call on the device thread."""
    heads = engine.heads[model]
    trunk = engine.trunks[engine.trunk_of[model]]
    limit = radius(threshold)
    if engine.precision != torch.float32:
        limit = threshold * (1 + LOW_PRECISION_SLACK) + 1e-3
    x = torch.stack(list(items)).to(engine.device)
    partial = torch.zeros(len(queries), x.shape[0], device=x.device)
    alive = torch.arange(x.shape[0], device=x.device)

    def keep(layer: int, raw: Tensor) -> Tensor:
        nonlocal alive
        with torch.autocast(x.device.type, enabled=False):  # the distance in float32
            f = normalize(raw.float())
            w = heads.weights[layer].to(f.device)
            for v, q in enumerate(queries):
                partial[v, alive] += F.conv2d((q[layer] - f) ** 2, w).mean(dim=(1, 2, 3))
        mask = (partial[:, alive] <= limit).any(dim=0)
        alive = alive[mask]
        return mask

    autocast: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if engine.precision != torch.float32:
        autocast = torch.autocast(x.device.type, dtype=engine.precision)
    with torch.inference_mode(), autocast:
        kept = trunk.forward_pruned(x, keep)
    return kept.cpu()
