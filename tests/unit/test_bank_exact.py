"""The bank's pruned exact stage (app.bank.exact, Trunk.forward_pruned): rows dropped after a tap
are not run further, the rows kept get the same features as a full pass, and the items kept are
exactly those whose distance to some query variant is within the threshold (pruning never drops a
match, and at these thresholds it keeps nothing else)."""

from __future__ import annotations

import pytest
import torch

from app.bank.exact import possible_matches
from app.imaging import load_tensor
from app.metric.engine import Engine
from app.metric.lpips import distance_from_features
from app.metric.queries import Image
from tests.support import IMAGENET
from tests.unit.conftest import BANK_MODELS

MODELS = BANK_MODELS


def tensors(n: int, start: int) -> list[torch.Tensor]:
    files = sorted(IMAGENET.glob("*.JPEG"))[start : start + n]
    return [load_tensor(f.read_bytes(), 64) for f in files]


def test_forward_pruned_drops_rows_and_keeps_the_others_features(bank_engine: Engine) -> None:
    trunk = bank_engine.trunks[bank_engine.trunk_of["lpips-alex"]]
    x = torch.stack(tensors(6, 40))
    full = trunk(x)
    seen: list[tuple[int, int]] = []
    taps: list[torch.Tensor] = []

    def keep(layer: int, raw: torch.Tensor) -> torch.Tensor:
        seen.append((layer, raw.shape[0]))
        taps.append(raw)
        mask = torch.ones(raw.shape[0], dtype=torch.bool)
        if layer == 0:
            mask[1::2] = False  # rows 1, 3, 5 stop after conv1
        if layer == 2:
            mask[0] = False  # row 0 stops after conv3
        return mask

    with torch.inference_mode():
        kept = trunk.forward_pruned(x, keep)
    assert kept.tolist() == [2, 4]
    assert seen == [(0, 6), (1, 3), (2, 3), (3, 2), (4, 2)]
    assert torch.allclose(taps[4], full[4][[2, 4]], atol=1e-5)
    with torch.inference_mode():
        none = trunk.forward_pruned(x, lambda layer, raw: torch.zeros(raw.shape[0], dtype=bool))
    assert none.numel() == 0


@pytest.mark.parametrize("model", MODELS)
def test_possible_matches_are_exactly_the_items_within_the_threshold(
    bank_engine: Engine, model: str
) -> None:
    """Queries: an image and its mirror (the mirror option); items: unrelated images and near copies
    of the query (darker, mirrored, noisy), at thresholds around their distances."""
    q = tensors(1, 60)[0]
    noise = 0.1 * torch.randn(q.shape, generator=torch.Generator().manual_seed(0))
    items = [
        *tensors(10, 61),
        (q * 0.8).clamp(-1, 1),
        q.flip(-1),
        (q + noise).clamp(-1, 1),
        (q * 0.5).clamp(-1, 1),
    ]
    variants = [Image(q, "q"), Image(q.flip(-1), "q:m")]
    feats = bank_engine.image_features(model, variants)
    queries = [[f[v : v + 1] for f in feats] for v in range(2)]
    item_feats = bank_engine.image_features(model, [Image(t, f"i{k}") for k, t in enumerate(items)])
    heads = bank_engine.heads[model]
    with torch.inference_mode():
        n = len(items)
        d = torch.stack(
            [
                distance_from_features(
                    heads, [f.expand(n, -1, -1, -1) for f in qv], item_feats
                ).total
                for qv in queries
            ]
        ).amin(0)
    sizes = []
    for thr in sorted({*d.tolist()[-4:], 0.05, 0.3, float(d.max()) + 1}):
        got = set(possible_matches(bank_engine, model, queries, items, thr).tolist())
        want = {k for k, v in enumerate(d.tolist()) if v <= thr}
        assert got == want, (thr, d.tolist())
        sizes.append(len(want))
    assert min(sizes) < 4 and 0 < sizes[2] < len(items) and max(sizes) == len(items)
