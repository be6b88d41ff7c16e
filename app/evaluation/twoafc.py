"""2AFC accuracy under APGD and Square with the binary margin loss (objective labels, ``h ∈ {0, 1}``).

For a triplet ``(ref, p0, p1)`` whose closer candidate is ``right`` (p1 when ``h = 1``), the margin is
``m = d(ref, wrong) − d(ref, right)``: the metric judges correctly when ``m > 0`` (score 1; 0.5 on a tie,
0 when flipped). Attacks *maximise* ``−m`` (i.e. minimise the margin) by perturbing the reference
(``target="ref"``, as NIGHTS/R-LPIPS evaluations do), the right candidate (push it away) or the wrong one
(pull it in); the other two images stay clean and are encoded once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from app.attacks.apgd import apgd
from app.attacks.pgd import Norm, perturbation_norms
from app.attacks.square import square
from app.evaluation.scorers import Scorer, encode, select
from app.training.datasets import TripletSet

Target = Literal["ref", "right", "wrong"]
Method = Literal["apgd", "square"]


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the suite; ``steps`` are APGD iterations, ``queries`` Square's budget."""

    method: Method
    norm: Norm
    epsilon: float
    target: Target = "ref"
    steps: int = 100
    restarts: int = 1
    queries: int = 1000
    seed: int = 0

    def label(self) -> str:
        eps = f"{self.epsilon * 255:g}/255" if self.norm == "linf" else f"{self.epsilon:g}"
        how = (
            f"APGD-{self.steps}x{self.restarts}"
            if self.method == "apgd"
            else f"Square-{self.queries}q"
        )
        return f"{how} {self.norm} {eps} on {self.target}"


def roles(ref: Tensor, p0: Tensor, p1: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(ref, right, wrong)``: the closer (by the objective label) and the farther candidate."""
    one = (h > 0.5).view(-1, 1, 1, 1)
    return ref, torch.where(one, p1, p0), torch.where(one, p0, p1)


def score(margin: Tensor) -> Tensor:
    """Per-triplet 2AFC score ``[N]`` from margins: 1 right, 0.5 tie, 0 wrong."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def margins(scorer: Scorer, ref: Tensor, right: Tensor, wrong: Tensor) -> Tensor:
    """Clean margins ``d(ref, wrong) − d(ref, right)`` ``[N]``."""
    fr, fa, fb = (encode(scorer, t) for t in (ref, right, wrong))
    with torch.no_grad():
        return scorer.distance(fr, fb) - scorer.distance(fr, fa)


def attack_batch(
    scorer: Scorer, ref: Tensor, right: Tensor, wrong: Tensor, spec: AttackSpec, g: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """``(adversarial margins [N], attacked image [N, 3, H, W], queries [N])`` for one batch."""
    images = {"ref": ref, "right": right, "wrong": wrong}
    fixed = {k: encode(scorer, v) for k, v in images.items() if k != spec.target}

    def neg_margin(x: Tensor, idx: Tensor) -> Tensor:
        fx = scorer.features(x)
        if spec.target == "ref":
            d_right = scorer.distance(fx, select(fixed["right"], idx))
            d_wrong = scorer.distance(fx, select(fixed["wrong"], idx))
        else:
            fr = select(fixed["ref"], idx)
            other = "wrong" if spec.target == "right" else "right"
            d_x, d_o = scorer.distance(fr, fx), scorer.distance(fr, select(fixed[other], idx))
            d_right, d_wrong = (d_x, d_o) if spec.target == "right" else (d_o, d_x)
        return d_right - d_wrong

    x = images[spec.target]
    if spec.method == "apgd":
        if not scorer.differentiable:
            raise ValueError(f"{scorer.name} has no gradient: use the Square attack")
        r = apgd(neg_margin, x, norm=spec.norm, epsilon=spec.epsilon, steps=spec.steps,
                 restarts=spec.restarts, success_above=0.0, generator=g)  # fmt: skip
        return -r.loss, r.x_adv, r.queries
    s = square(neg_margin, x, norm=spec.norm, epsilon=spec.epsilon, queries=spec.queries,
               success_above=0.0, generator=g)  # fmt: skip
    return -s.loss, s.x_adv, s.queries


def evaluate_2afc(
    scorer: Scorer,
    data: TripletSet,
    specs: list[AttackSpec],
    batch_size: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean accuracy and, per attack, adversarial accuracy, mean margin, measured norms and queries."""
    ref, p0, p1 = data.images()
    ref, right, wrong = roles(ref, p0, p1, data.h)
    clean = margins(scorer, ref, right, wrong)
    out: dict[str, Any] = {
        "n": len(data),
        "clean": float(score(clean).mean()),
        "clean_mean_margin": float(clean.mean()),
        "attacks": [],
    }
    for spec in specs:
        adv_m, linf, l2, queries = [], [], [], []
        bar = tqdm(range(0, len(data), batch_size), desc=f"{scorer.name} {spec.label()}",
                   disable=not progress)  # fmt: skip
        for i in bar:
            sl = slice(i, i + batch_size)
            g = torch.Generator().manual_seed(spec.seed * 1_000_003 + i)
            m, x_adv, q = attack_batch(scorer, ref[sl], right[sl], wrong[sl], spec, g)
            clean_x = {"ref": ref, "right": right, "wrong": wrong}[spec.target][sl]
            a, b = perturbation_norms(x_adv, clean_x)
            # a clean judgment that is already wrong stays counted as wrong
            adv_m.append(torch.minimum(m, clean[sl]))
            linf.append(a)
            l2.append(b)
            queries.append(q)
        m_all = torch.cat(adv_m)
        out["attacks"].append(
            {
                **asdict(spec),
                "label": spec.label(),
                "accuracy": float(score(m_all).mean()),
                "mean_margin": float(m_all.mean()),
                "max_linf": float(torch.cat(linf).max()),
                "max_l2": float(torch.cat(l2).max()),
                "mean_queries": float(torch.cat(queries).float().mean()),
            }
        )
    return out
