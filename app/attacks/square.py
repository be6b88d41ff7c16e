"""Square attack (Andriushchenko et al. 2020), score-based and gradient-free, under L∞ and L2.

Maximises a per-sample loss ``loss_fn(x_adv, idx) -> [len(idx)]`` (as in :mod:`app.attacks.apgd`; it is
only *evaluated*, never differentiated, so it may be a hash or any black box) over ``‖δ_i‖ ≤ ε`` and
``x + δ ∈ [0, 1]``, images ``[N, 3, H, W]`` in ``[0, 1]``. Every candidate is projected with
:func:`app.attacks.pgd.project`.

- Start: vertical stripes, ``±ε`` per column and channel (L∞), or the same stripes scaled to L2 norm ε.
- Each iteration proposes, per sample still being attacked, a change inside one random square window whose
  side shrinks with the schedule ``p`` (the paper's piecewise halving of ``p_init`` over the budget):
  L∞: the window is set to ``±ε`` per channel; L2: the paper's update — a pseudo-Gaussian bump of random
  sign per channel is added to the window's normalised old perturbation, the mass of a second window is
  moved into it, and the total is rescaled to norm ε.
- A proposal is kept when its loss is at least the current one (unlike the reference code, an L∞ proposal
  equal to the current window is not redrawn: it costs a query and changes nothing). One loss evaluation (query) per sample
  for the start and per iteration; samples whose loss exceeds ``success_above`` stop early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from app.attacks.apgd import IndexedLoss, check_budget
from app.attacks.pgd import Norm, check_pixels, l2_norms, project

_TINY = 1e-12
_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@dataclass(frozen=True)
class SquareResult:
    """``x_adv`` ``[N, 3, H, W]``, its ``loss`` ``[N]`` and the ``queries`` ``[N]`` spent per sample."""

    x_adv: Tensor
    loss: Tensor
    queries: Tensor


def p_schedule(p_init: float, it: int, n_iters: int) -> float:
    """The paper's fraction of pixels changed at iteration ``it`` of ``n_iters`` (rescaled to 10k)."""
    t = int(it / max(n_iters, 1) * 10000)
    p = p_init
    for b in _BOUNDS:
        if t > b:
            p /= 2
    return p


def _pseudo_gaussian(s: int, device: torch.device) -> Tensor:
    """The paper's ``meta_pseudo_gaussian_pert``: two opposite-signed centred bumps, unit L2 norm."""

    def bump(h: int, w: int) -> Tensor:
        out = torch.zeros(h, w, device=device)
        cy, cx = h // 2 - 1, w // 2 - 1
        r = max(cy, cx) + 1
        for c in range(r):
            y0, x0 = max(cy - c, 0), max(cx - c, 0)
            out[y0 : max(cy + c + 1, 0), x0 : max(cx + c + 1, 0)] += 1.0 / (c + 1) ** 2
        unit: Tensor = out / out.norm().clamp_min(_TINY)
        return unit

    d = torch.zeros(s, s, device=device)
    half = s // 2
    d[:half] = bump(half, s)
    d[half:] = -bump(s - half, s)
    res: Tensor = d / d.norm().clamp_min(_TINY)
    return res


def _stripes(x: Tensor, norm: Norm, epsilon: float, g: torch.Generator) -> Tensor:
    n, c, _, w = x.shape
    signs = torch.randint(0, 2, (n, c, 1, w), generator=g).float() * 2 - 1
    delta = (signs * epsilon).expand_as(x.cpu()).to(x)
    if norm == "l2":
        delta = delta * (epsilon / l2_norms(delta).float().clamp_min(_TINY)).view(-1, 1, 1, 1).to(x)
    return project(delta, x, norm, epsilon)


def _window(g: torch.Generator, h: int, w: int, s: int) -> tuple[int, int]:
    return int(torch.randint(0, h - s + 1, (1,), generator=g)), int(
        torch.randint(0, w - s + 1, (1,), generator=g)
    )


def _propose(
    x: Tensor, delta: Tensor, norm: Norm, epsilon: float, p: float, g: torch.Generator
) -> Tensor:
    n, c, h, w = x.shape
    side = round(math.sqrt(p * h * w))
    new = delta.clone()
    if norm == "linf":
        s = min(max(side, 1), h - 1, w - 1) if min(h, w) > 1 else 1
        for i in range(n):
            y0, x0 = _window(g, h, w, s)
            signs = (torch.randint(0, 2, (c, 1, 1), generator=g).float() * 2 - 1).to(x)
            new[i, :, y0 : y0 + s, x0 : x0 + s] = signs * epsilon
        return project(new, x, norm, epsilon)
    s = min(max(side, 3), h - 1, w - 1)
    s = s + 1 if s % 2 == 0 and s + 1 < min(h, w) else s
    bump = _pseudo_gaussian(s, x.device).to(x)
    for i in range(n):
        (y0, x0), (y1, x1) = _window(g, h, w, s), _window(g, h, w, s)
        d = new[i]
        win = d[:, y0 : y0 + s, x0 : x0 + s]
        win_norm = win.flatten(1).norm(dim=1).clamp_min(_TINY).view(c, 1, 1)
        mask = torch.zeros(h, w, dtype=torch.bool, device=x.device)
        mask[y0 : y0 + s, x0 : x0 + s] = True
        mask[y1 : y1 + s, x1 : x1 + s] = True
        both = (d * mask).flatten(1).norm(dim=1).view(c, 1, 1)
        free = max(epsilon**2 - float(d.double().pow(2).sum()), 0.0) / c
        signs = (torch.randint(0, 2, (c, 1, 1), generator=g).float() * 2 - 1).to(x)
        upd = bump * signs + win / win_norm
        upd = upd / upd.flatten(1).norm(dim=1).clamp_min(_TINY).view(c, 1, 1)
        upd = upd * (free + both**2).sqrt()
        d[:, y1 : y1 + s, x1 : x1 + s] = 0.0
        d[:, y0 : y0 + s, x0 : x0 + s] = upd
        total = d.flatten().norm().clamp_min(_TINY)
        new[i] = d * (epsilon / total)
    return project(new, x, norm, epsilon)


def square(
    loss_fn: IndexedLoss,
    x: Tensor,
    *,
    norm: Norm,
    epsilon: float,
    queries: int = 1000,
    p_init: float | None = None,
    success_above: float | None = None,
    generator: torch.Generator | None = None,
) -> SquareResult:
    """Square attack with a budget of ``queries`` loss evaluations per sample (start included)."""
    check_budget(norm, epsilon)
    check_pixels(x)
    if queries < 1:
        raise ValueError(f"queries must be >= 1, got {queries}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    p0 = p_init if p_init is not None else (0.05 if norm == "linf" else 0.1)
    n = x.shape[0]
    all_idx = torch.arange(n, device=x.device)
    with torch.inference_mode(False), torch.no_grad():
        x = x.detach().clone()
        delta = _stripes(x, norm, epsilon, g)
        loss = loss_fn(x + delta, all_idx).detach().float()
        used = torch.ones(n, dtype=torch.long)
        for it in range(1, queries):
            active = all_idx if success_above is None else all_idx[~(loss > success_above)]
            if active.numel() == 0:
                break
            p = p_schedule(p0, it, queries)
            cand = _propose(x[active], delta[active], norm, epsilon, p, g)
            new_loss = loss_fn(x[active] + cand, active).detach().float()
            used[active.cpu()] += 1
            keep = new_loss >= loss[active]
            delta[active[keep]] = cand[keep]
            loss[active[keep]] = new_loss[keep]
    return SquareResult((x + delta).clamp(0.0, 1.0), loss, used)
