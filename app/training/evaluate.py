"""Clean and adversarial 2AFC accuracy of any metric on a :class:`TripletSet`.

2AFC score per triplet: ``h`` when the metric finds p1 closer (``d1 < d0``), ``1 - h`` when it finds p0
closer, 0.5 on a tie; accuracy is the mean. The adversarial score attacks p0 white-box with PGD
(default L∞ 4/255 px, 20 steps, random start) to flip the metric's judgment towards the wrong answer:
it maximises ``sign(0.5 - h) · (d0 - d1)`` (push p0 away when the judges prefer it, pull it closer when
they prefer p1), a loss on the metric's distances alone, so every model meets the same attack. A triplet's
adversarial score is the worst score over all PGD iterates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from app.attacks.pgd import Norm, default_step_size, pgd_steps
from app.imaging import to_signed
from app.metric.lpips import LPIPS, distance_from_features
from app.training.datasets import KINDS, TripletSet
from app.training.model import two_afc_score


@dataclass(frozen=True)
class TwoAFCAttack:
    norm: Norm = "linf"
    epsilon: float = 4 / 255
    steps: int = 20
    step_size: float | None = None
    seed: int = 0

    @property
    def effective_step_size(self) -> float:
        if self.step_size is not None:
            return self.step_size
        return default_step_size(self.norm, self.epsilon, max(1, self.steps))


@dataclass
class Scores:
    """Per-triplet clean and adversarial 2AFC scores ``[N]`` and the label kind of each triplet."""

    clean: Tensor
    adversarial: Tensor
    kind: Tensor
    summary: dict[str, float] = field(default_factory=dict)


def _distances(metric: LPIPS, ref: Tensor, p0: Tensor, p1: Tensor) -> tuple[Tensor, Tensor]:
    n = ref.shape[0]
    f = metric.features(to_signed(torch.cat([ref, p0, p1])))
    fr, f0, f1 = ([t[k * n : (k + 1) * n] for t in f] for k in range(3))
    return _pair(metric, fr, f0), _pair(metric, fr, f1)


def _pair(metric: LPIPS, fa: list[Tensor], fb: list[Tensor]) -> Tensor:
    """Distances ``[N]`` between two normalised feature lists under ``metric``'s heads."""
    return distance_from_features(metric.heads, fa, fb).total


def score_batch(
    metric: LPIPS,
    ref: Tensor,
    p0: Tensor,
    p1: Tensor,
    h: Tensor,
    spec: TwoAFCAttack,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``(clean, adversarial)`` scores ``[N]`` for a batch of images in ``[0, 1]``."""
    with torch.no_grad():
        d0, d1 = _distances(metric, ref, p0, p1)
        f_ref = metric.features(to_signed(ref))
    clean = two_afc_score(d0, d1, h)
    if spec.steps == 0 or spec.epsilon == 0:
        return clean, clean
    sign = torch.sign(0.5 - h)

    def loss_fn(x: Tensor) -> Tensor:
        return sign * (_pair(metric, f_ref, metric.features(to_signed(x))) - d1)

    worst = clean.clone()
    for x_adv in pgd_steps(
        loss_fn, p0, norm=spec.norm, epsilon=spec.epsilon, steps=spec.steps,
        step_size=spec.effective_step_size, generator=generator,
    ):  # fmt: skip
        with torch.no_grad():
            d0_adv = _pair(metric, f_ref, metric.features(to_signed(x_adv)))
        worst = torch.minimum(worst, two_afc_score(d0_adv, d1, h))
    return clean, worst


def evaluate(
    metric: LPIPS,
    data: TripletSet,
    spec: TwoAFCAttack,
    batch_size: int = 50,
    device: torch.device = torch.device("cpu"),
    desc: str = "2afc",
    progress: bool = False,
) -> Scores:
    """Clean and adversarial scores of ``metric`` on every triplet of ``data``; summary by label kind."""
    metric = metric.to(device)
    clean, adv = [], []
    for i in tqdm(range(0, len(data), batch_size), desc=desc, disable=not progress):
        idx = torch.arange(i, min(i + batch_size, len(data)))
        ref, p0, p1 = (t.to(device) for t in data.images(idx))
        g = torch.Generator().manual_seed(spec.seed * 1_000_003 + i)
        c, a = score_batch(metric, ref, p0, p1, data.h[idx].to(device), spec, g)
        clean.append(c.cpu())
        adv.append(a.cpu())
    s = Scores(torch.cat(clean), torch.cat(adv), data.kind.clone())
    s.summary = summarize(s)
    return s


def summarize(s: Scores) -> dict[str, float]:
    """Accuracies overall and per label kind, and the triplet counts."""
    out = {
        "n": float(len(s.clean)),
        "clean": float(s.clean.mean()),
        "adversarial": float(s.adversarial.mean()),
    }
    for k, name in enumerate(KINDS):
        m = s.kind == k
        if bool(m.any()):
            out[f"n_{name}"] = float(m.sum())
            out[f"clean_{name}"] = float(s.clean[m].mean())
            out[f"adversarial_{name}"] = float(s.adversarial[m].mean())
    return out


def markdown_table(results: dict[str, dict[str, float]], spec: TwoAFCAttack) -> str:
    """A markdown table of ``results`` (model name → summary); clean columns only without an attack."""
    attacked = spec.steps > 0 and spec.epsilon > 0
    kinds = [k for k in KINDS if any(f"n_{k}" in r for r in results.values())]
    cols = [("clean", "clean 2AFC")] + ([("adversarial", "adversarial 2AFC")] if attacked else [])
    for k in kinds:
        cols += [(f"clean_{k}", f"clean ({k})")]
        cols += [(f"adversarial_{k}", f"adv ({k})")] if attacked else []
    head = ["model", *(title for _, title in cols)] + (["adv / clean"] if attacked else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        row = [f"`{name}`", *(f"{r.get(key, float('nan')):.4f}" for key, _ in cols)]
        if attacked:
            row.append(f"{r['adversarial'] / r['clean']:.3f}" if r["clean"] else "nan")
        lines.append("| " + " | ".join(row) + " |")
    n = int(next(iter(results.values()))["n"])
    eps = f"{spec.epsilon * 255:g}/255" if spec.norm == "linf" else f"{spec.epsilon:g}"
    how = (
        f"attack: PGD {spec.norm} ε = {eps} px on p0, {spec.steps} steps, step "
        f"{spec.effective_step_size:.5f}, random start, seed {spec.seed}"
        if attacked
        else "no attack (clean accuracy only)"
    )
    return "\n".join([*lines, "", f"n = {n} triplets; {how}."])
