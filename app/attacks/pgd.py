"""Projected gradient descent (PGD) attacks under L∞ and L2, in ``[0, 1]`` pixel units.

Pure and model-agnostic: an attack maximises a per-sample loss ``loss_fn(x_adv) -> [N]`` over
perturbations ``δ`` with ``‖δ_i‖ ≤ ε`` (per sample) and ``x + δ ∈ [0, 1]``. Images are ``[N, 3, H, W]``
float tensors in ``[0, 1]`` (not the metric's ``[-1, 1]``). Steps are sign-gradient steps (L∞) or
normalised-gradient steps (L2) of size ``step_size``; every iterate is projected back onto the ball and
the pixel range. Autograd is enabled locally for the perturbation only, so callers may run in
``torch.inference_mode``; model weights are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal, get_args

import torch
from torch import Tensor

Norm = Literal["linf", "l2"]
NORMS: tuple[Norm, ...] = get_args(Norm)
LossFn = Callable[[Tensor], Tensor]

_TINY = 1e-12


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def check_pixels(x: Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a float ``[N, 3, H, W]`` tensor in ``[0, 1]``."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3, H, W], got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        lo, hi = float(x.min()), float(x.max())
        raise ValueError(f"{name} values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")


def l2_norms(delta: Tensor) -> Tensor:
    """Per-sample L2 norms ``[N]`` (float64) of ``delta`` ``[N, ...]``."""
    out: Tensor = torch.linalg.vector_norm(delta.detach().flatten(1).double(), dim=1)
    return out


def linf_norms(delta: Tensor) -> Tensor:
    """Per-sample L∞ norms ``[N]`` (float64) of ``delta`` ``[N, ...]``."""
    return delta.detach().flatten(1).double().abs().amax(dim=1)


def project(delta: Tensor, x: Tensor, norm: Norm, epsilon: float) -> Tensor:
    """Project ``delta`` ``[N, 3, H, W]`` so that ``‖delta_i‖ ≤ ε`` per sample and ``x + delta ∈ [0, 1]``.

    L∞: clamp to ``[-ε, ε]``. L2: rescale samples whose norm exceeds ε onto the sphere (norm in float64).
    Then clip ``x + delta`` to ``[0, 1]``: with ``x ∈ [0, 1]`` that only shrinks components towards 0,
    so the norm bound still holds. Not differentiable by design (call under ``no_grad``).
    """
    _check_norm(norm)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if delta.shape != x.shape:
        raise ValueError(f"delta {list(delta.shape)} and x {list(x.shape)} differ in shape")
    if norm == "linf":
        delta = delta.clamp(-epsilon, epsilon)
    else:
        n = l2_norms(delta)
        factor = torch.where(n > epsilon, epsilon / n.clamp_min(_TINY), torch.ones_like(n))
        delta = (delta.double() * factor.view(-1, 1, 1, 1)).to(delta.dtype)
    return (x + delta).clamp(0.0, 1.0) - x


def default_step_size(norm: Norm, epsilon: float, steps: int) -> float:
    """``2.5 · ε / steps`` (Madry et al. 2018): enough to cross the ball and back within the budget."""
    _check_norm(norm)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return 2.5 * epsilon / steps


def sample_start(
    x: Tensor, norm: Norm, epsilon: float, generator: torch.Generator | None = None
) -> Tensor:
    """A random perturbation inside the ball: uniform in ``[-ε, ε]`` per pixel (L∞), or a uniformly
    random direction with a radius uniform in ``[0, ε]`` (L2). Drawn on the generator's device (CPU
    by default), then moved to ``x``'s device, so a seed gives the same start on every device."""
    dev = generator.device if generator is not None else torch.device("cpu")
    shape = tuple(x.shape)
    if norm == "linf":
        d = (torch.rand(shape, generator=generator, device=dev) * 2 - 1) * epsilon
    else:
        d = torch.randn(shape, generator=generator, device=dev)
        r = torch.rand((shape[0],), generator=generator, device=dev) * epsilon
        d = d * (r / l2_norms(d).float().clamp_min(_TINY)).view(-1, 1, 1, 1)
    return d.to(device=x.device, dtype=x.dtype)


def _ascent_direction(grad: Tensor, norm: Norm) -> Tensor:
    """Steepest-ascent direction of unit norm: ``sign(g)`` (L∞) or ``g / ‖g‖_2`` per sample (L2)."""
    if norm == "linf":
        return grad.sign()
    n: Tensor = torch.linalg.vector_norm(grad.flatten(1), dim=1)
    n = n.clamp_min(_TINY)
    return grad / n.view(-1, 1, 1, 1)


def _gradient(loss_fn: LossFn, x: Tensor, delta: Tensor) -> Tensor:
    """``∂ Σ loss_fn(x + δ) / ∂δ`` with autograd enabled locally (works under inference mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        d = delta.detach().clone().requires_grad_(True)
        loss = loss_fn(x + d)
        if loss.shape != (x.shape[0],):
            raise ValueError(
                f"loss_fn must return a per-sample loss of shape [{x.shape[0]}], "
                f"got {list(loss.shape)}"
            )
        (grad,) = torch.autograd.grad(loss.sum(), d)
    return grad


def check_params(norm: str, epsilon: float, steps: int, step_size: float) -> None:
    """Raise ``ValueError`` naming the first bad attack parameter (ε in [0, 1], steps ≥ 0, step > 0)."""
    _check_norm(norm)
    if not (math.isfinite(epsilon) and 0 <= epsilon <= 1):
        raise ValueError(f"epsilon must be in [0, 1] (pixel units), got {epsilon}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be > 0, got {step_size}")


def _check_args(x: Tensor, norm: Norm, epsilon: float, steps: int, step_size: float) -> None:
    check_params(norm, epsilon, steps, step_size)
    check_pixels(x)


def _init(
    x: Tensor, norm: Norm, epsilon: float, random_start: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """A normal (non-inference) copy of ``x`` and the projected starting perturbation."""
    with torch.inference_mode(False), torch.no_grad():
        x = x.detach().clone()
        delta = torch.zeros_like(x)
        if random_start:
            delta = sample_start(x, norm, epsilon, generator)
        return x, project(delta, x, norm, epsilon)


def pgd_steps(
    loss_fn: LossFn,
    x: Tensor,
    *,
    norm: Norm,
    epsilon: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """PGD that *maximises* ``loss_fn``; yields the adversarial batch after each of ``steps`` steps.

    ``x``: clean images ``[N, 3, H, W]`` in ``[0, 1]``. ``loss_fn(x_adv)`` maps ``[N, 3, H, W]`` images
    in ``[0, 1]`` to a per-sample loss ``[N]``. Each yielded ``x_adv`` is detached, lies in ``[0, 1]``
    and within ``ε`` of ``x`` per sample. Yielding between steps lets a scheduler interleave other work;
    no autograd or inference-mode state is held across a ``yield``.
    """
    _check_args(x, norm, epsilon, steps, step_size)
    x, delta = _init(x, norm, epsilon, random_start, generator)
    for _ in range(steps):
        grad = _gradient(loss_fn, x, delta)
        with torch.inference_mode(False), torch.no_grad():
            delta = project(delta + step_size * _ascent_direction(grad, norm), x, norm, epsilon)
            x_adv = (x + delta).clamp(0.0, 1.0)
        yield x_adv


def pgd(
    loss_fn: LossFn,
    x: Tensor,
    *,
    norm: Norm,
    epsilon: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run :func:`pgd_steps` to the end; the final ``x_adv`` ``[N, 3, H, W]`` in ``[0, 1]``.

    With ``steps == 0`` this is the (projected) random start, or ``x`` itself without one.
    """
    if steps == 0:
        _check_args(x, norm, epsilon, steps, step_size)
        x0, delta = _init(x, norm, epsilon, random_start, generator)
        return (x0 + delta).clamp(0.0, 1.0)
    final = x
    for x_adv in pgd_steps(
        loss_fn,
        x,
        norm=norm,
        epsilon=epsilon,
        steps=steps,
        step_size=step_size,
        random_start=random_start,
        generator=generator,
    ):
        final = x_adv
    return final


LEVELS = 255  # 8-bit PNG: pixel values k / 255


def _l2_feasible(q: Tensor, x: Tensor, epsilon: float) -> Tensor:
    return l2_norms(q - x) <= epsilon


def to_levels(x: Tensor) -> Tensor:
    """Nearest 8-bit level ``k / 255`` of every pixel of ``x`` (in [0, 1]), exactly, in float64."""
    return (x.double() * LEVELS).round().clamp(0, LEVELS) / LEVELS


def quantize(x_adv: Tensor, x: Tensor, norm: Norm, epsilon: float) -> Tensor:
    """Round ``x_adv`` ``[N, 3, H, W]`` to 8-bit levels *inside* the ε-ball around ``x`` (both in [0, 1]).

    Plain rounding can leave the ball (``x`` need not lie on levels, e.g. after a resize). L∞: each
    pixel takes the level nearest ``x_adv`` among the levels within ε of ``x`` (exact; always possible
    for ε ≥ 0.5/255). L2: the perturbation is scaled by the largest ``s ∈ [0, 1]`` (bisection, per sample)
    whose rounding stays in the ball. If no 8-bit image lies within ε of ``x`` (tiny ε and ``x`` off the
    levels) the nearest 8-bit image is returned; measure the result with :func:`perturbation_norms`.
    Returns ``x``'s dtype; ``to_levels(result)`` recovers the exact levels ``k / 255`` in float64 (what a
    PNG holds, and what the ball check above is made on).
    """
    _check_norm(norm)
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv {list(x_adv.shape)} and x {list(x.shape)} differ in shape")
    xd, ad = x.detach().double(), x_adv.detach().double()
    if norm == "linf":
        lo = torch.ceil((xd - epsilon).clamp_min(0) * LEVELS)
        hi = torch.floor((xd + epsilon).clamp_max(1) * LEVELS)
        k = torch.minimum(torch.maximum((ad * LEVELS).round(), lo), hi)
        k = torch.where(lo <= hi, k, (xd * LEVELS).round())
        return (k / LEVELS).to(x.dtype)
    delta = ad - xd
    ok_lo = torch.zeros(x.shape[0], dtype=torch.double, device=x.device)
    hi = torch.ones_like(ok_lo)
    full = to_levels(ad)
    done = _l2_feasible(full, xd, epsilon)
    for _ in range(20):
        mid = (ok_lo + hi) / 2
        feasible = _l2_feasible(to_levels(xd + mid.view(-1, 1, 1, 1) * delta), xd, epsilon)
        ok_lo = torch.where(feasible, mid, ok_lo)
        hi = torch.where(feasible, hi, mid)
    best = to_levels(xd + ok_lo.view(-1, 1, 1, 1) * delta)
    return torch.where(done.view(-1, 1, 1, 1), full, best).to(x.dtype)


def perturbation_norms(x_adv: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Measured ``(linf [N], l2 [N])`` norms (float64) of ``x_adv − x``, both ``[N, 3, H, W]`` in [0, 1]."""
    delta = x_adv.detach().double() - x.detach().double()
    return linf_norms(delta), l2_norms(delta)
