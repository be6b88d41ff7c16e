"""Near-duplicate detection: benign edits vs all pairs of unrelated images; evasion and impersonation.

Positives are ``(original, edited)`` pairs (:data:`app.evaluation.data.EDITS`); negatives are *all*
pairs of a set of unrelated images, whose distances come from features cached once per image
(:func:`app.evaluation.scorers.pairwise`), so ``M`` images give ``M(M−1)/2`` negatives for ``M`` trunk
passes. A pair matches when ``d <= threshold``. The false-match rate (FMR) is the share of matching
negatives; detection (TPR) the share of matching positives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from app.attacks.apgd import apgd
from app.attacks.pgd import Norm
from app.attacks.square import square
from app.evaluation.scorers import Scorer, encode, pairwise, select

FMR_TARGET = 1e-5


def negative_distances(
    scorer: Scorer, x: Tensor, groups: Tensor | None = None, mirror: bool = False
) -> Tensor:
    """Distances of every unordered pair of rows of ``x`` ``[M, 3, H, W]`` (``[M(M−1)/2]``, float64);
    with ``groups`` ``[M]`` only pairs from different groups (e.g. crops of different sources).
    ``mirror``: the service's mirror invariance, row ``i`` the reference: ``min(d(x_i, x_j),
    d(x_i, flip x_j))``."""
    f = encode(scorer, x, desc=f"{scorer.name} unrelated images")
    d = pairwise(scorer, f)
    if mirror:
        flipped = encode(scorer, x.flip(-1), desc=f"{scorer.name} mirrored unrelated images")
        d = torch.minimum(d, pairwise(scorer, f, flipped))
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    keep = torch.ones(len(i), dtype=torch.bool) if groups is None else groups[i] != groups[j]
    return d[i[keep], j[keep]]


def threshold_at_fmr(neg: Tensor, fmr: float = FMR_TARGET) -> float:
    """The largest threshold whose FMR on ``neg`` is at most ``fmr``: just below the
    ``(⌊fmr·n⌋ + 1)``-th smallest negative distance."""
    allowed = int(np.floor(fmr * len(neg)))
    kth = neg.sort().values[min(allowed, len(neg) - 1)]
    return float(torch.nextafter(kth, torch.tensor(-np.inf, dtype=kth.dtype)))  # in neg's dtype


def auc(pos: Tensor, neg: Tensor) -> float:
    """``P(d_pos < d_neg) + ½ P(d_pos = d_neg)`` (exact, via the sorted negatives)."""
    s = neg.double().sort().values
    p = pos.double()
    above = len(s) - torch.searchsorted(s, p, right=True)
    ties = torch.searchsorted(s, p, right=True) - torch.searchsorted(s, p, right=False)
    return float((above.double() + 0.5 * ties.double()).sum() / (len(p) * len(s)))


def roc_points(pos: Tensor, neg: Tensor, n: int = 200) -> dict[str, list[float]]:
    """``(fmr, tpr)`` at thresholds spread over the negatives' low tail and the positives."""
    qs = torch.cat([pos.double(), neg.double().sort().values[: max(1, len(neg) // 100)]])
    cand = torch.quantile(qs, torch.linspace(0, 1, n, dtype=torch.float64)).tolist()
    fmr = [float((neg <= t).double().mean()) for t in cand]
    tpr = [float((pos <= t).double().mean()) for t in cand]
    return {"threshold": cand, "fmr": fmr, "tpr": tpr}


def detection_report(
    pos: Tensor, names: list[str], neg: Tensor, threshold: float
) -> dict[str, Any]:
    """Per-edit detection at the model's threshold and at the threshold of FMR 1e-5; FMR; AUC."""
    t5 = threshold_at_fmr(neg)
    edits = sorted(set(names), key=names.index)

    def per_edit(t: float) -> dict[str, float]:
        return {e: float((pos[[k for k, n in enumerate(names) if n == e]] <= t).double().mean())
                for e in edits}  # fmt: skip

    false = int((neg <= threshold).sum())
    return {
        "threshold": threshold,
        "n_positives": len(pos),
        "n_negatives": len(neg),
        "fmr_resolution": 1.0 / len(neg),
        "false_matches": false,
        "fmr": false / len(neg),
        "detection": per_edit(threshold),
        "detection_all": float((pos <= threshold).double().mean()),
        "auc": auc(pos, neg),
        "auc_by_edit": {
            e: auc(pos[[k for k, n in enumerate(names) if n == e]], neg) for e in edits
        },
        "threshold_fmr_1e-5": t5,
        "detection_fmr_1e-5": per_edit(t5),
        "negative_quantiles": {
            f"{q:g}": float(torch.quantile(neg.double(), q)) for q in (0.00001, 0.001, 0.01, 0.5)
        },
        "roc": roc_points(pos, neg),
    }


def positive_distances(
    scorer: Scorer, orig: Tensor, edited: Tensor, mirror: bool = False, chunk: int = 64
) -> Tensor:
    """``d(orig[i // E], edited[i])`` for the ``E`` edits of every original (``[M·E]``); ``mirror``:
    the minimum over the edited copy and its mirror (the service's ``invariance: ["hflip"]``). The
    copies are encoded ``chunk`` at a time (a 256² AlexNet feature list is 2.5 MB per image)."""
    per = len(edited) // len(orig)
    fo = encode(scorer, orig)
    out = []
    starts = tqdm(range(0, len(edited), chunk), desc=f"{scorer.name} edited copies", leave=False)
    for i in starts:
        part = edited[i : i + chunk]
        fsel = select(fo, torch.arange(i, i + len(part)) // per)
        with torch.no_grad():
            d = scorer.distance(fsel, encode(scorer, part)).double()
            if mirror:
                d = torch.minimum(d, scorer.distance(fsel, encode(scorer, part.flip(-1))).double())
        out.append(d)
    return torch.cat(out)


def attack_pairs(
    scorer: Scorer,
    ref: Tensor,
    cand: Tensor,
    *,
    goal: str,
    norm: Norm,
    epsilon: float,
    steps: int,
    restarts: int,
    queries: int,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Perturb ``cand`` within the ball so that the pair crosses the threshold.

    ``goal="evade"``: among pairs that match when clean, the share pushed above the threshold (APGD on
    the distance, or Square for a scorer without gradient). ``goal="impersonate"``: among pairs that do
    not match when clean, the share pulled to ``d <= threshold``.
    """
    thr = scorer.threshold
    fr = encode(scorer, ref)
    with torch.no_grad():
        clean = scorer.distance(fr, encode(scorer, cand))
    eligible = clean <= thr if goal == "evade" else clean > thr
    sign = 1.0 if goal == "evade" else -1.0
    adv = clean.clone()
    rows = torch.nonzero(eligible).flatten()
    bar = tqdm(range(0, len(rows), batch_size), desc=f"{scorer.name} {goal}", disable=not progress)
    for i in bar:
        r = rows[i : i + batch_size]

        def loss(x: Tensor, idx: Tensor, r: Tensor = r) -> Tensor:
            d = scorer.distance(select(fr, r[idx]), scorer.features(x))
            # > 0 exactly when the goal is reached (evade: d > thr; impersonate: d <= thr, up to ties)
            return sign * (d - thr) + (0.0 if goal == "evade" else 1e-9)

        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        if scorer.differentiable:
            res = apgd(loss, cand[r], norm=norm, epsilon=epsilon, steps=steps, restarts=restarts,
                       success_above=0.0, generator=g)  # fmt: skip
            x_adv = res.x_adv
        else:
            x_adv = square(loss, cand[r], norm=norm, epsilon=epsilon, queries=queries,
                           success_above=0.0, generator=g).x_adv  # fmt: skip
        with torch.no_grad():
            adv[r] = scorer.distance(select(fr, r), encode(scorer, x_adv))
    hit = (adv > thr) if goal == "evade" else (adv <= thr)
    n = int(eligible.sum())
    method = "apgd" if scorer.differentiable else "square"
    return {
        "goal": goal,
        "method": method,
        "norm": norm,
        "epsilon": epsilon,
        "steps": steps if method == "apgd" else None,
        "restarts": restarts if method == "apgd" else None,
        "queries": queries if method == "square" else None,
        "pairs": len(ref),
        "eligible": n,
        "succeeded": int((hit & eligible).sum()),
        "rate": float((hit & eligible).sum()) / n if n else float("nan"),
        "clean_median": float(clean[eligible].median()) if n else float("nan"),
        "adversarial_median": float(adv[eligible].median()) if n else float("nan"),
    }
