"""PGD attack library: projection invariants, steps, seeds, gradient scoping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.attacks import (
    Norm,
    default_step_size,
    l2_norms,
    linf_norms,
    pgd,
    pgd_steps,
    project,
)

TOL = 1e-6


def _norms(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    return linf_norms(delta) if norm == "linf" else l2_norms(delta)


@settings(max_examples=60, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    epsilon=st.floats(0.0, 1.0),
    scale=st.floats(0.0, 5.0),
    n=st.integers(1, 3),
    side=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_projection_invariants(
    norm: Norm, epsilon: float, scale: float, n: int, side: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 3, side, side), generator=g)
    x[0, 0, 0, 0] = 1.0  # pixels on the boundary of the valid range
    x[-1, -1, -1, -1] = 0.0
    delta = torch.randn((n, 3, side, side), generator=g) * scale
    p = project(delta, x, norm, epsilon)
    assert bool((_norms(p, norm) <= epsilon + TOL).all())
    assert float((x + p).min()) >= 0.0 and float((x + p).max()) <= 1.0
    # a perturbation already feasible is left unchanged
    again = project(p, x, norm, epsilon)
    assert torch.allclose(again, p, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    epsilon=st.floats(0.0, 0.5),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_iterate_is_feasible(norm: Norm, epsilon: float, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((2, 3, 5, 5), generator=g)
    w = torch.randn((1, 3, 5, 5), generator=g)

    def loss(xa: torch.Tensor) -> torch.Tensor:
        return (xa * w).flatten(1).sum(1) ** 2

    iterates = list(
        pgd_steps(loss, x, norm=norm, epsilon=epsilon, steps=steps, step_size=0.3, generator=g)
    )
    assert len(iterates) == steps
    for xa in iterates:
        assert not xa.requires_grad
        assert bool((_norms(xa - x, norm) <= epsilon + TOL).all())
        assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0


def test_linf_step_is_a_sign_step_and_l2_step_is_normalised() -> None:
    x = torch.full((1, 3, 4, 4), 0.5)
    w = torch.linspace(-1, 1, 48).view(1, 3, 4, 4)

    def linear(xa: torch.Tensor) -> torch.Tensor:
        return (xa * w).flatten(1).sum(1)

    xa = pgd(linear, x, norm="linf", epsilon=0.1, steps=1, step_size=0.03, random_start=False)
    assert torch.allclose(xa - x, 0.03 * w.sign(), atol=1e-7)
    xa = pgd(linear, x, norm="l2", epsilon=1.0, steps=1, step_size=0.2, random_start=False)
    assert torch.allclose(xa - x, 0.2 * w / w.norm(), atol=1e-6)


def test_seeded_random_start_reproduces_and_differs_across_seeds() -> None:
    x = torch.rand((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))

    def loss(xa: torch.Tensor) -> torch.Tensor:
        return (xa**3).flatten(1).sum(1)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return pgd(loss, x, norm="l2", epsilon=0.5, steps=2, step_size=0.1, generator=g)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_gradients_flow_under_inference_mode_without_touching_weights() -> None:
    lin = torch.nn.Conv2d(3, 1, 1)
    for p in lin.parameters():
        p.requires_grad_(False)

    def loss(xa: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = lin(xa).flatten(1).sum(1)
        return out

    with torch.inference_mode():
        x = torch.full((1, 3, 4, 4), 0.5)
        xa = pgd(loss, x, norm="linf", epsilon=0.1, steps=3, step_size=0.05, random_start=False)
        assert torch.is_inference_mode_enabled()
    assert float(loss(xa)[0]) > float(loss(x)[0])
    assert not any(p.requires_grad for p in lin.parameters())
    assert lin.weight.grad is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "l1"}, "norm"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon": 2.0}, "epsilon"),
        ({"steps": -1}, "steps"),
        ({"step_size": 0.0}, "step_size"),
    ],
)
def test_bad_parameters_are_named(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"norm": "linf", "epsilon": 0.1, "steps": 1, "step_size": 0.01}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pgd(lambda xa: xa.flatten(1).sum(1), torch.rand(1, 3, 4, 4), **args)  # type: ignore[arg-type]


def test_default_step_size() -> None:
    assert default_step_size("linf", 4 / 255, 20) == pytest.approx(2.5 * 4 / 255 / 20)
    with pytest.raises(ValueError, match="steps"):
        default_step_size("l2", 1.0, 0)
