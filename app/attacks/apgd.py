"""Auto-PGD (APGD, Croce & Hein 2020) under L∞ and L2, in ``[0, 1]`` pixel units, with restarts.

Maximises a per-sample loss ``loss_fn(x_adv, idx) -> [len(idx)]`` (``idx``: the positions of the rows of
``x_adv`` in the original batch, so the loss may hold per-sample constants) over ``‖δ_i‖ ≤ ε`` and
``x + δ ∈ [0, 1]``. Images are ``[N, 3, H, W]`` floats in ``[0, 1]`` (the conventions of
:mod:`app.attacks.pgd`, whose :func:`~app.attacks.pgd.project` is applied to every iterate).

The algorithm (their Alg. 1, as in the reference ``autoattack`` code): step size ``η = 2ε`` per sample;
``z = P(x_k + η · s(∇))`` with ``s`` the sign (L∞) or the unit-L2 gradient; the momentum step
``x_{k+1} = P(x_k + α (z − x_k) + (1 − α)(x_k − x_{k−1}))`` with ``α = 0.75`` (1 on the first step);
checkpoints after ``0.22·n``, then shrinking by ``0.03·n`` down to ``0.06·n`` iterations; at a checkpoint
a sample's step is halved and it restarts from its best point when fewer than ``ρ = 0.75`` of the steps
since the last checkpoint increased its loss, or when its step was not halved at the last checkpoint and
its best loss has not improved since (there the momentum term restarts at zero, where the reference code
keeps the pre-checkpoint iterate). The best iterate (highest loss) per sample is returned.

Restarts draw a fresh random start inside the ball; with ``success_above`` set, samples whose best loss
already exceeds it are not attacked again (the attack has succeeded on them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from app.attacks.pgd import NORMS, Norm, check_pixels, project, sample_start

#: ``loss_fn(x_adv [n, 3, H, W], idx [n]) -> loss [n]``: the loss to *maximise*, per sample.
IndexedLoss = Callable[[Tensor, Tensor], Tensor]

ALPHA = 0.75
RHO = 0.75
_TINY = 1e-12


def check_budget(norm: str, epsilon: float) -> None:
    """Raise ``ValueError`` unless ``norm`` is known and ``ε ≥ 0`` is finite (L∞: at most 1; L2 radii
    such as 3.0 exceed 1 in [0, 1] pixel units, unlike PGD's check)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if not (math.isfinite(epsilon) and epsilon >= 0 and (norm == "l2" or epsilon <= 1)):
        raise ValueError(f"epsilon must be >= 0 (and <= 1 for linf) in pixel units, got {epsilon}")


@dataclass(frozen=True)
class APGDResult:
    """``x_adv`` ``[N, 3, H, W]`` (best iterate per sample), its ``loss`` ``[N]`` and ``queries`` ``[N]``
    (loss evaluations spent on each sample, all restarts)."""

    x_adv: Tensor
    loss: Tensor
    queries: Tensor


def checkpoints(steps: int) -> list[int]:
    """Iterations after which the step-size conditions are checked (``p_{j+1} = p_j + max(p_j −
    p_{j−1} − 0.03, 0.06)``, ``p_1 = 0.22``), as in the reference code's integer version."""
    out: list[int] = []
    k = max(int(0.22 * steps), 1)
    k_min, decr = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    at = k
    while at < steps:
        out.append(at)
        k = max(k - decr, k_min)
        at += k
    return out


def _direction(grad: Tensor, norm: Norm) -> Tensor:
    if norm == "linf":
        return grad.sign()
    n = torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(_TINY)
    out: Tensor = grad / n.view(-1, 1, 1, 1)
    return out


def _loss_and_grad(loss_fn: IndexedLoss, x_adv: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False), torch.enable_grad():
        z = x_adv.detach().clone().requires_grad_(True)
        loss = loss_fn(z, idx)
        if loss.shape != (x_adv.shape[0],):
            raise ValueError(
                f"loss_fn must return a per-sample loss of shape [{x_adv.shape[0]}], "
                f"got {list(loss.shape)}"
            )
        (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad.detach()


def apgd_run(
    loss_fn: IndexedLoss,
    x: Tensor,
    idx: Tensor,
    *,
    norm: Norm,
    epsilon: float,
    steps: int,
    start: Tensor,
) -> tuple[Tensor, Tensor]:
    """One APGD run from ``x + start``: ``(best x_adv [n, 3, H, W], best loss [n])``; ``steps + 1``
    loss evaluations per sample (the start counts)."""
    with torch.inference_mode(False), torch.no_grad():
        x = x.detach().clone()
        shape = (-1, 1, 1, 1)
        x_cur = x + project(start, x, norm, epsilon)
    loss, grad = _loss_and_grad(loss_fn, x_cur, idx)
    with torch.inference_mode(False), torch.no_grad():
        n = x.shape[0]
        eta = torch.full((n,), 2.0 * epsilon, dtype=x.dtype, device=x.device)
        best_x, best_loss, best_grad = x_cur.clone(), loss.clone(), grad.clone()
        x_prev = x_cur.clone()
        increases = torch.zeros(n, device=x.device)
        last_best = best_loss.clone()
        halved_last = torch.zeros(n, dtype=torch.bool, device=x.device)
        marks, since = set(checkpoints(steps)), 0
    for k in range(steps):
        with torch.inference_mode(False), torch.no_grad():
            z = x + project(x_cur + eta.view(shape) * _direction(grad, norm) - x, x, norm, epsilon)
            a = 1.0 if k == 0 else ALPHA
            step = x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev)
            x_prev, x_cur = x_cur, x + project(step - x, x, norm, epsilon)
        new_loss, grad = _loss_and_grad(loss_fn, x_cur, idx)
        with torch.inference_mode(False), torch.no_grad():
            increases += (new_loss > loss).float()
            loss = new_loss
            better = loss > best_loss
            best_x[better], best_grad[better] = x_cur[better], grad[better]
            best_loss = torch.where(better, loss, best_loss)
            since += 1
            if k + 1 in marks:
                stalled = increases < RHO * since
                no_gain = ~halved_last & (best_loss <= last_best)
                halve = stalled | no_gain
                eta = torch.where(halve, eta / 2, eta)
                x_cur[halve], grad[halve] = best_x[halve], best_grad[halve]
                x_prev[halve] = best_x[halve]
                halved_last, last_best = halve, best_loss.clone()
                increases.zero_()
                since = 0
    return best_x, best_loss


def apgd(
    loss_fn: IndexedLoss,
    x: Tensor,
    *,
    norm: Norm,
    epsilon: float,
    steps: int = 100,
    restarts: int = 1,
    success_above: float | None = None,
    generator: torch.Generator | None = None,
) -> APGDResult:
    """APGD with ``restarts`` random starts (the first one too); the best iterate per sample.

    ``x``: clean images ``[N, 3, H, W]`` in ``[0, 1]``. The result lies in ``[0, 1]`` and within ε of
    ``x`` per sample. ``success_above``: skip samples whose best loss exceeds it in later restarts.
    """
    check_budget(norm, epsilon)
    check_pixels(x)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    n = x.shape[0]
    with torch.inference_mode(False), torch.no_grad():
        xs = x.detach().clone()
        best_x = xs.clone()
        best_loss = torch.full((n,), float("-inf"), device=x.device)
        queries = torch.zeros(n, dtype=torch.long)
    for _ in range(restarts):
        todo = torch.arange(n, device=x.device)
        if success_above is not None:
            todo = todo[~(best_loss > success_above)]
        if todo.numel() == 0:
            break
        start = sample_start(xs[todo], norm, epsilon, generator)
        bx, bl = apgd_run(
            loss_fn, xs[todo], todo, norm=norm, epsilon=epsilon, steps=steps, start=start
        )
        with torch.inference_mode(False), torch.no_grad():
            better = bl > best_loss[todo]
            best_x[todo[better]] = bx[better]
            best_loss[todo[better]] = bl[better]
            queries[todo.cpu()] += steps + 1
    return APGDResult(best_x, best_loss, queries)
