"""The metric against the reference ``lpips`` package (same weights) on random inputs."""

from __future__ import annotations

from pathlib import Path

import lpips
import pytest
import torch

from app.metric import LPIPS, check_images
from app.metric.store import ModelStore

TRUNK_FILE = {"alex": "alexnet-features.pth", "squeeze": "squeezenet1_1-features.pth"}


def reference(net: str, weights_dir: Path, spatial: bool = False) -> lpips.LPIPS:
    """The reference implementation with the offline trunk and head weights loaded."""
    ref = lpips.LPIPS(
        net=net,
        pretrained=True,
        pnet_rand=True,
        verbose=False,
        spatial=spatial,
        model_path=str(weights_dir / f"lpips-v0.1-{net}-lin.pth"),
    )
    state = torch.load(weights_dir / TRUNK_FILE[net], map_location="cpu", weights_only=True)
    mapped = {}
    for key in ref.net.state_dict():
        _, idx, param = key.split(".", 2)
        mapped[key] = state[f"features.{idx}.{param}"]
    ref.net.load_state_dict(mapped)
    return ref.eval()


@pytest.fixture(scope="module", params=["alex", "squeeze"])
def net(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def pair(net: str, store: ModelStore, weights_dir: Path) -> tuple[LPIPS, lpips.LPIPS]:
    return store.load(f"lpips-{net}"), reference(net, weights_dir)


def random_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    x1 = (x0 + 0.3 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)
    return x0, x1


@torch.inference_mode()
def test_total_and_per_layer_match_reference(pair: tuple[LPIPS, lpips.LPIPS]) -> None:
    ours, ref = pair
    x0, x1 = random_images(4, 64, seed=0)
    total_ref, layers_ref = ref(x0, x1, retPerLayer=True)
    res = ours.compare(x0, x1)
    torch.testing.assert_close(res.total, total_ref.flatten(), atol=1e-5, rtol=0)
    per_layer_ref = torch.stack([v.flatten() for v in layers_ref], dim=1)
    torch.testing.assert_close(res.per_layer, per_layer_ref, atol=1e-5, rtol=0)
    assert res.total.min() > 0


@torch.inference_mode()
def test_spatial_map_matches_reference(net: str, store: ModelStore, weights_dir: Path) -> None:
    ours, ref = store.load(f"lpips-{net}"), reference(net, weights_dir, spatial=True)
    x0, x1 = random_images(2, 96, seed=1)
    spatial_ref = ref(x0, x1)
    res = ours.compare(x0, x1, spatial=True)
    assert res.spatial is not None and res.spatial.shape == (2, 1, 96, 96)
    torch.testing.assert_close(res.spatial, spatial_ref, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_non_square_and_identical_inputs(pair: tuple[LPIPS, lpips.LPIPS]) -> None:
    ours, ref = pair
    x0, x1 = random_images(1, 80, seed=2)
    x0, x1 = x0[..., :64], x1[..., :64]
    torch.testing.assert_close(ours(x0, x1), ref(x0, x1).flatten(), atol=1e-5, rtol=0)
    assert float(ours(x0, x0)) == 0.0


def test_batched_equals_unbatched(store: ModelStore) -> None:
    metric = store.load("lpips-alex")
    x0, x1 = random_images(5, 64, seed=3)
    with torch.inference_mode():
        batched = metric(x0, x1)
        single = torch.cat([metric(x0[i : i + 1], x1[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("shape", "scale", "message"),
    [
        ((1, 1, 8, 8), 1.0, r"shape \[N, 3, H, W\]"),
        ((3, 8, 8), 1.0, "shape"),
        ((1, 3, 8, 8), 2.0, r"\[-1, 1\]"),
    ],
)
def test_shape_and_range_are_checked(shape: tuple[int, ...], scale: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_images(torch.ones(shape) * scale)


def test_metric_is_eval_locked_and_frozen(store: ModelStore) -> None:
    metric = store.load("lpips-alex")
    metric.train()
    assert not metric.training and not metric.trunk.training
    assert not any(p.requires_grad for p in metric.parameters())
    x0, x1 = random_images(1, 32, seed=4)
    x1.requires_grad_(True)
    metric(x0, x1).sum().backward()
    assert x1.grad is not None and x1.grad.abs().sum() > 0
