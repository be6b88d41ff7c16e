"""The robust fine-tuning objective: a human-calibrated teacher's clean judgments, a bounded adversarial
change, geometric near-copies counted as "same", unrelated images kept apart, and balanced layers.

The student starts as the teacher (LPIPS-alex: trunk and heads) and fine-tunes its trunk and its
non-negative heads. Every step draws ``batch`` *training* source images (:class:`SourcePool`, only the
train split of ``split_sources``) and builds:

- **patch pairs** (64×64, as the 2AFC data): a random square crop ``x`` of each source and a traditional
  distortion ``y = D(x, t)`` (:mod:`app.training.distortions`, severity ``t ~ U(0, 1)``);
- **views** (``image_size``²): the whole source ``a`` and a geometric edit ``g(a)``: crop removing up to
  ``crop`` of each side, rotation up to ``rotate`` degrees, shift up to ``shift`` of the side, optional
  mirror; unrelated pairs are ``(a_i, g(a_j))`` with ``i ≠ j`` (different sources by construction).

Loss (all distances are the student's ``d_S`` unless marked ``d_T``, the frozen teacher's):

- ``distill``: ``(log(d_S + c) − log(d_T + c))²`` over patch pairs, view positives and unrelated pairs
  (keeps the teacher's clean ranking and scale);
- ``adv`` (TRADES-like): ``d_S(y, y + δ*)`` with ``δ*`` from PGD maximising it within the L∞ ball
  ``epsilon`` (the adversarial change of the metric around a point, bounded);
- ``geo``: ``relu(d_S(a, g(a)) − pos_margin)² + relu(neg_margin − d_S(a_i, g(a_j)))²`` (means);
- ``balance``: ``Σ_l relu(share_l − max_share)²`` averaged over pairs, ``share_l = d_l / d``;
- ``rank`` (optional, ``w_rank``): objective 2AFC triplets ``(x, right, wrong)`` (the same distortion
  draw at severities ≥ 0.3 apart) with PGD on ``right``: ``relu(d_S(x, right+δ*) − d_S(x, wrong) + m)``;
- ``adv_view`` (optional, ``w_adv_view``): the TRADES-like term on the whole-image views, ``d_S(a, a + δ*)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from app.attacks.pgd import default_step_size, pgd
from app.imaging import decode, resize, to_signed
from app.metric.lpips import LPIPS, distance_from_features
from app.training import distortions
from app.training.datasets import source_files, split_sources

#: The project's source split (docs/TRAINING.md): train sources only ever feed this objective.
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
LOG_EPS = 0.01


@dataclass(frozen=True)
class RobustConfig:
    """Everything that defines a fine-tuning run (saved in checkpoints and bundles)."""

    steps: int = 900
    batch: int = 16
    image_size: int = 128
    patch: int = 64
    lr: float = 2e-5
    head_lr: float = 1e-4
    decay_from: float = 0.5  # fraction of the steps after which the lr decays linearly to 0
    epsilon: float = 4 / 255
    attack_steps: int = 3
    w_distill: float = 1.0
    w_adv: float = 1.0
    w_geo: float = 1.0
    w_balance: float = 1.0
    w_rank: float = 0.0
    w_adv_view: float = 0.0
    rank_margin: float = 0.01
    pos_margin: float = 0.25
    neg_margin: float = 0.45
    max_share: float = 0.5
    crop: float = 0.2
    rotate: float = 5.0
    shift: float = 0.03
    flip: float = 0.0
    seed: int = 0

    def lr_factor(self, step: int) -> float:
        start = int(self.decay_from * self.steps)
        if step < start or self.steps <= start:
            return 1.0
        return max(0.0, 1.0 - (step - start) / (self.steps - start))


def train_sources(images_dir: Path) -> list[Path]:
    """The train split's source files (never val, test or Kodak)."""
    files = source_files(images_dir)
    return [files[i] for i in split_sources(len(files), SPLIT_SEED, SPLIT_FRACTIONS)["train"]]


@dataclass
class SourcePool:
    """Decoded sources resized to ``size``² (the service's path), uint8 ``[M, 3, size, size]``."""

    images: Tensor
    files: list[Path]

    @classmethod
    def load(cls, files: list[Path], size: int = 160) -> SourcePool:
        imgs = [np.asarray(resize(decode(p.read_bytes()), size), dtype=np.uint8) for p in files]
        return cls(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(), list(files))

    def __len__(self) -> int:
        return len(self.files)

    def unit(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` as float ``[N, 3, s, s]`` in ``[0, 1]``."""
        return self.images[idx].float() / 255


# -- geometric views ---------------------------------------------------------------------------


def geometric_thetas(n: int, cfg: RobustConfig, g: torch.Generator) -> Tensor:
    """Random affine maps ``[n, 2, 3]`` (output → input, normalised coordinates): zoom into a crop
    removing up to ``cfg.crop`` of each side (random placement), rotate up to ``cfg.rotate``°, shift
    up to ``cfg.shift`` of the side, mirror with probability ``cfg.flip``."""
    u = torch.rand(n, 6, generator=g)
    s = 1 - cfg.crop * u[:, 0]
    ang = torch.deg2rad((2 * u[:, 1] - 1) * cfg.rotate)
    tx = (2 * u[:, 2] - 1) * (1 - s) + (2 * u[:, 4] - 1) * 2 * cfg.shift
    ty = (2 * u[:, 3] - 1) * (1 - s) + (2 * u[:, 5] - 1) * 2 * cfg.shift
    flip = torch.where(torch.rand(n, generator=g) < cfg.flip, -1.0, 1.0)
    cos, sin = torch.cos(ang) * s, torch.sin(ang) * s
    row0 = torch.stack([cos * flip, -sin, tx], dim=1)
    row1 = torch.stack([sin * flip, cos, ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def identity_thetas(n: int) -> Tensor:
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3).clone()


def warp(x: Tensor, theta: Tensor, size: int) -> Tensor:
    """``x`` ``[N, 3, H, W]`` in [0, 1] sampled through ``theta`` ``[N, 2, 3]`` to ``size``², reflecting
    at the borders (bilinear, antialiasing ignored: ``size`` is close to the source size)."""
    grid = F.affine_grid(theta.to(x), [x.shape[0], 3, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp(0, 1)


def patch_thetas(n: int, patch: int, source: int, g: torch.Generator) -> Tensor:
    """Square crops of side ``patch``..``3·patch`` px (capped by the source), random placement."""
    u = torch.rand(n, 3, generator=g)
    side = torch.clamp(patch + u[:, 0] * 2 * patch, max=source) / source
    tx = (2 * u[:, 1] - 1) * (1 - side)
    ty = (2 * u[:, 2] - 1) * (1 - side)
    z = torch.zeros(n)
    return torch.stack(
        [torch.stack([side, z, tx], dim=1), torch.stack([z, side, ty], dim=1)], dim=1
    )


@dataclass
class Batch:
    """One step's images, all ``[N, 3, ·, ·]`` in [0, 1]: patches ``x``/``y`` and views ``a``/``b``."""

    x: Tensor
    y: Tensor
    a: Tensor
    b: Tensor
    right: Tensor | None = None
    wrong: Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return Batch(self.x.to(device), self.y.to(device), self.a.to(device), self.b.to(device),
                     mv(self.right), mv(self.wrong))  # fmt: skip


def draw_batch(pool: SourcePool, cfg: RobustConfig, step: int) -> Batch:
    """Step ``step``'s batch: a function of ``(cfg.seed, step)`` only (so resumes reproduce it)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    idx = torch.randperm(len(pool), generator=g)[: cfg.batch]
    src = pool.unit(idx)
    a = warp(src, identity_thetas(len(idx)), cfg.image_size)
    b = warp(src, geometric_thetas(len(idx), cfg, g), cfg.image_size)
    x = warp(src, patch_thetas(len(idx), cfg.patch, src.shape[-1], g), cfg.patch)
    rng = np.random.default_rng([cfg.seed, 31337, step])
    rng2 = np.random.default_rng([cfg.seed, 4711, step])  # 2AFC partners: a stream of their own
    ys, rights, wrongs = [], [], []
    for i in range(len(x)):
        _, dist = distortions.sample(rng, (cfg.patch, cfg.patch), 0.3)
        t = float(rng.uniform(0, 1))
        ys.append(dist(x[i], t).clamp(0, 1))
        if cfg.w_rank > 0:  # the same draw 0.3..: milder is "right" (objective 2AFC labels)
            if t >= 0.5:
                rights.append(dist(x[i], t - float(rng2.uniform(0.3, t))).clamp(0, 1))
                wrongs.append(ys[-1])
            else:
                rights.append(ys[-1])
                wrongs.append(dist(x[i], t + float(rng2.uniform(0.3, 1 - t))).clamp(0, 1))
    batch = Batch(x=x, y=torch.stack(ys), a=a, b=b)
    if rights:
        batch.right, batch.wrong = torch.stack(rights), torch.stack(wrongs)
    return batch


# -- objective ---------------------------------------------------------------------------------


def features(metric: LPIPS, x: Tensor) -> list[Tensor]:
    return metric.features(to_signed(x))


def split(f: list[Tensor], n: int) -> tuple[list[Tensor], list[Tensor]]:
    return [t[:n] for t in f], [t[n:] for t in f]


def log_gap(d_s: Tensor, d_t: Tensor) -> Tensor:
    """``(log(d_S + c) − log(d_T + c))²`` per pair ``[N]``: zero exactly where the distances agree."""
    return (torch.log(d_s + LOG_EPS) - torch.log(d_t + LOG_EPS)) ** 2


def balance_penalty(per_layer: Tensor, max_share: float) -> Tensor:
    """``Σ_l relu(share_l − max_share)²`` per pair ``[N]`` from per-layer distances ``[N, L]``."""
    share = per_layer / per_layer.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return (share - max_share).clamp_min(0).pow(2).sum(dim=1)


def margin_terms(
    d_pos: Tensor, d_neg: Tensor, pos_margin: float, neg_margin: float
) -> tuple[Tensor, Tensor]:
    """``(mean relu(d_pos − pos_margin)², mean relu(neg_margin − d_neg)²)``."""
    pos = (d_pos - pos_margin).clamp_min(0).pow(2).mean()
    neg = (neg_margin - d_neg).clamp_min(0).pow(2).mean()
    return pos, neg


def adversarial_change(
    student: LPIPS, y: Tensor, fy: list[Tensor], cfg: RobustConfig, g: torch.Generator
) -> Tensor:
    """``d_S(y, y + δ*)`` ``[N]`` with ``δ*`` from ``cfg.attack_steps`` PGD steps maximising it (L∞
    ``cfg.epsilon``, random start); differentiable in the student's parameters through ``fy``."""
    if cfg.attack_steps == 0 or cfg.epsilon == 0:
        return torch.zeros(y.shape[0], device=y.device)
    heads = student.heads
    clean = [t.detach() for t in fy]

    def loss_fn(z: Tensor) -> Tensor:
        return distance_from_features(heads, clean, features(student, z)).total

    step = default_step_size("linf", cfg.epsilon, cfg.attack_steps)
    z = pgd(loss_fn, y, norm="linf", epsilon=cfg.epsilon, steps=cfg.attack_steps,
            step_size=step, generator=g)  # fmt: skip
    return distance_from_features(heads, fy, features(student, z.detach())).total


def adversarial_rank(
    student: LPIPS, batch: Batch, fx: list[Tensor], cfg: RobustConfig, g: torch.Generator
) -> Tensor:
    """``relu(d_S(x, right + δ*) − d_S(x, wrong) + rank_margin)`` ``[N]``: the 2AFC margin under
    PGD on the closer candidate (the evaluation's attack), kept positive."""
    assert batch.right is not None and batch.wrong is not None
    heads = student.heads
    fw = features(student, batch.wrong)
    clean_x, clean_w = [t.detach() for t in fx], [t.detach() for t in fw]

    def loss_fn(z: Tensor) -> Tensor:
        d_r = distance_from_features(heads, clean_x, features(student, z)).total
        return d_r - distance_from_features(heads, clean_x, clean_w).total

    step = default_step_size("linf", cfg.epsilon, max(1, cfg.attack_steps))
    z = pgd(loss_fn, batch.right, norm="linf", epsilon=cfg.epsilon,
            steps=cfg.attack_steps, step_size=step, generator=g)  # fmt: skip
    d_r = distance_from_features(heads, fx, features(student, z.detach())).total
    d_w = distance_from_features(heads, fx, fw).total
    return (d_r - d_w + cfg.rank_margin).clamp_min(0)


def pair_distances(metric: LPIPS, fa: list[Tensor], fb: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(total [N], per_layer [N, L])``."""
    r = distance_from_features(metric.heads, fa, fb)
    return r.total, r.per_layer


def negative_index(n: int) -> tuple[Tensor, Tensor]:
    """All ordered pairs ``(i, j)``, ``i ≠ j``, of ``n`` items."""
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = i != j
    return i[keep], j[keep]


def robust_loss(
    student: LPIPS, teacher: LPIPS, batch: Batch, cfg: RobustConfig, g: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """The weighted objective (scalar) and its terms (floats) for one batch."""
    n = batch.x.shape[0]
    with torch.no_grad():
        tp = features(teacher, torch.cat([batch.x, batch.y]))
        tv = features(teacher, torch.cat([batch.a, batch.b]))
    sp = features(student, torch.cat([batch.x, batch.y]))
    sv = features(student, torch.cat([batch.a, batch.b]))
    (tx, ty), (sx, sy) = split(tp, n), split(sp, n)
    (ta, tb), (sa, sb) = split(tv, n), split(sv, n)
    ni, nj = negative_index(n)

    def sel(f: list[Tensor], idx: Tensor) -> list[Tensor]:
        return [t[idx] for t in f]

    d_patch, l_patch = pair_distances(student, sx, sy)
    d_pos, l_pos = pair_distances(student, sa, sb)
    d_neg, _ = pair_distances(student, sel(sa, ni), sel(sb, nj))
    with torch.no_grad():
        t_patch, _ = pair_distances(teacher, tx, ty)
        t_pos, _ = pair_distances(teacher, ta, tb)
        t_neg, _ = pair_distances(teacher, sel(ta, ni), sel(tb, nj))
    distill = torch.cat(
        [log_gap(d_patch, t_patch), log_gap(d_pos, t_pos), log_gap(d_neg, t_neg)]
    ).mean()
    adv = adversarial_change(student, batch.y, sy, cfg, g).mean()
    pos, neg = margin_terms(d_pos, d_neg, cfg.pos_margin, cfg.neg_margin)
    balance = balance_penalty(torch.cat([l_patch, l_pos]), cfg.max_share).mean()
    adv_view = (
        adversarial_change(student, batch.a, sa, cfg, g).mean()
        if cfg.w_adv_view > 0
        else torch.zeros((), device=batch.x.device)
    )
    rank = (
        adversarial_rank(student, batch, sx, cfg, g).mean()
        if cfg.w_rank > 0
        else torch.zeros((), device=batch.x.device)
    )
    total = (
        cfg.w_distill * distill
        + cfg.w_adv * adv
        + cfg.w_geo * (pos + neg)
        + cfg.w_balance * balance
        + cfg.w_rank * rank
        + cfg.w_adv_view * adv_view
    )
    terms = {
        "loss": float(total.detach()),
        "distill": float(distill.detach()),
        "adv": float(adv.detach()),
        "geo_pos": float(pos.detach()),
        "geo_neg": float(neg.detach()),
        "balance": float(balance.detach()),
        "rank": float(rank.detach()),
        "adv_view": float(adv_view.detach()),
        "d_pos_max": float(d_pos.detach().max()),
        "d_neg_min": float(d_neg.detach().min()),
    }
    return total, terms
