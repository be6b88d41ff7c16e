"""Robustness checks of LPIPS / R-LPIPS models: white-box PGD on each model's own gradients.

Images here are ``[N, 3, H, W]`` float tensors in ``[0, 1]`` pixel units (the attack's units); the metric
sees ``2x − 1``. ``evade`` maximises ``d(reference, candidate + δ)`` ("push a known item away"),
``impersonate`` minimises it ("pull an unrelated image close"); without a candidate the reference is
attacked against itself. Several pairs and several models run as one PGD batch (rows model-major:
row ``m·N + n`` is pair ``n`` under model ``m``); models holding the *same* trunk object share one trunk
pass per step. Results are measured on the 8-bit image that would be returned (see
:func:`app.attacks.pgd.quantize`). Results are typed; how a caller shows them is the caller's business.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from app.attacks.pgd import (
    NORMS,
    LossFn,
    Norm,
    check_params,
    check_pixels,
    default_step_size,
    perturbation_norms,
    pgd_steps,
    quantize,
    to_levels,
)
from app.imaging import tensor_to_png, to_signed
from app.metric.lpips import LPIPS, distance_from_features
from app.metric.store import ModelStore
from app.metric.trunks import Trunk

Goal = Literal["evade", "impersonate"]
GOALS: tuple[Goal, ...] = get_args(Goal)

#: PGD steps of a check when the caller names none.
DEFAULT_STEPS = 20
#: Default ε per norm in [0, 1] pixel units: L∞ 4/255 (the paper's 8/255 on [-1, 1] images), L2 1.0.
DEFAULT_EPSILON: dict[Norm, float] = {"linf": 4 / 255, "l2": 1.0}


@dataclass(frozen=True)
class Target:
    """A model to attack: its name, metric and near-duplicate threshold (match iff ``d <= threshold``)."""

    name: str
    metric: LPIPS
    threshold: float


#: Seeds are JSON-safe integers (exact in a double): drawn below 2^53 and accepted up to 2^53 - 1.
MAX_SEED = 2**53 - 1


@dataclass(frozen=True)
class AttackSpec:
    """Attack parameters; ``None`` means the default (ε per norm, step size from ε and steps, a fresh
    random seed). :meth:`resolved` fills every default so a response can echo the effective values."""

    norm: Norm = "linf"
    epsilon: float | None = None
    steps: int = DEFAULT_STEPS
    step_size: float | None = None
    goal: Goal = "evade"
    random_start: bool = True
    seed: int | None = None

    def resolved(self) -> AttackSpec:
        if self.goal not in GOALS:
            raise ValueError(f"goal must be one of {', '.join(GOALS)}, got {self.goal!r}")
        if self.norm not in NORMS:
            raise ValueError(f"attack must be one of {', '.join(NORMS)}, got {self.norm!r}")
        eps = DEFAULT_EPSILON[self.norm] if self.epsilon is None else self.epsilon
        step = self.step_size
        if step is None:  # with ε (about) 0 any step is projected away: take one pixel level
            step = default_step_size(self.norm, eps, max(self.steps, 1)) or 1 / 255
        seed = secrets.randbits(53) if self.seed is None else self.seed
        check_params(self.norm, eps, self.steps, step)
        return AttackSpec(self.norm, eps, self.steps, step, self.goal, self.random_start, seed)


def _grouped_features(metrics: Sequence[LPIPS], x: Tensor) -> list[list[Tensor]]:
    """Normalised features of row block ``m`` of ``x`` ``[M·N, 3, H, W]`` (in [-1, 1]) under model ``m``;
    models holding the same trunk object get one trunk pass over all their blocks together."""
    n = x.shape[0] // len(metrics)
    blocks: list[list[Tensor]] = [[] for _ in metrics]
    groups: dict[int, list[int]] = {}
    for m, metric in enumerate(metrics):
        groups.setdefault(id(metric.trunk), []).append(m)
    for members in groups.values():
        rows = torch.cat([x[m * n : (m + 1) * n] for m in members])
        feats = metrics[members[0]].features(rows)
        for j, m in enumerate(members):
            blocks[m] = [f[j * n : (j + 1) * n] for f in feats]
    return blocks


class LPIPSObjective:
    """Distances from fixed references under several models, differentiable in the other image.

    ``reference`` ``[N, 3, H, W]`` in [0, 1]; its features are computed once, without gradients. The
    other image is a batch ``[M·N, 3, H, W]`` in [0, 1], row ``m·N + n`` compared under model ``m`` with
    reference ``n``. ``mirror``: distances are invariant to mirroring the other image (the minimum
    over it and its mirror, as :mod:`app.metric.queries` computes ``hflip``).
    """

    def __init__(
        self, metrics: LPIPS | Sequence[LPIPS], reference: Tensor, mirror: bool = False
    ) -> None:
        self.metrics = [metrics] if isinstance(metrics, LPIPS) else list(metrics)
        self.mirror = mirror
        if not self.metrics:
            raise ValueError("at least one model is needed")
        with torch.inference_mode(False), torch.no_grad():
            tiled = to_signed(reference.detach().clone()).repeat(len(self.metrics), 1, 1, 1)
            self._ref = _grouped_features(self.metrics, tiled)

    def distance(self, x: Tensor) -> Tensor:
        """``[M·N]`` distances of ``x`` ``[M·N, 3, H, W]`` (in [0, 1]) to the references; with
        ``mirror`` the smaller of the distances of ``x`` and of its left-right mirror (``hflip``)."""
        d = self._distance(x)
        return torch.minimum(d, self._distance(x.flip(-1))) if self.mirror else d

    def _distance(self, x: Tensor) -> Tensor:
        adv = _grouped_features(self.metrics, to_signed(x))
        pairs = zip(self.metrics, self._ref, adv, strict=True)
        return torch.cat([distance_from_features(m.heads, r, a).total for m, r, a in pairs])

    def loss(self, goal: Goal) -> LossFn:
        """The per-row loss that PGD maximises: ``+d`` for ``evade``, ``−d`` for ``impersonate``."""
        if goal not in GOALS:
            raise ValueError(f"goal must be one of {', '.join(GOALS)}, got {goal!r}")
        sign = 1.0 if goal == "evade" else -1.0
        return lambda x_adv: sign * self.distance(x_adv)


def feature_mse_loss(trunk: Trunk, clean: Tensor) -> LossFn:
    """Untargeted feature attack: ``Σ_l mean((f_l(x_adv) − f_l(clean))²)`` over the trunk's raw taps,
    per sample; ``clean`` ``[N, 3, H, W]`` in [0, 1]."""
    with torch.inference_mode(False), torch.no_grad():
        target = trunk(to_signed(clean.detach().clone()))

    def loss(x_adv: Tensor) -> Tensor:
        feats = trunk(to_signed(x_adv))
        return torch.stack(
            [((f - t) ** 2).flatten(1).mean(1) for f, t in zip(feats, target, strict=True)]
        ).sum(0)

    return loss


@dataclass(frozen=True)
class ModelResult:
    """One model's outcome for one pair. ``adversarial`` is the returned 8-bit image ``[3, H, W]`` in
    [0, 1] on the CPU; ``adversarial_distance`` is measured on it, ``unquantized_distance`` on the PGD
    iterate."""

    model: str
    threshold: float
    clean_distance: float
    adversarial_distance: float
    unquantized_distance: float
    linf: float
    l2: float
    adversarial: Tensor = field(repr=False)

    @property
    def clean_match(self) -> bool:
        return self.clean_distance <= self.threshold

    @property
    def adversarial_match(self) -> bool:
        return self.adversarial_distance <= self.threshold

    @property
    def change(self) -> float:
        return self.adversarial_distance - self.clean_distance

    @property
    def flipped(self) -> bool:
        """The near-duplicate decision changed under the attack."""
        return self.clean_match != self.adversarial_match

    def png(self) -> bytes:
        """The adversarial image as lossless 8-bit PNG bytes (exactly the levels that were measured)."""
        return tensor_to_png(to_signed(self.adversarial))


def _device(metric: LPIPS) -> torch.device:
    return next(metric.parameters()).device


class RobustnessJob:
    """Attack N (reference, candidate) pairs under M targets as one PGD batch.

    ``references`` ``[N, 3, H, W]`` in [0, 1]; ``candidates`` the same shape, or ``None`` to attack each
    reference against itself. Iterate :meth:`steps` (one yield per PGD step, so a device worker can run
    other batches in between), then call :meth:`results` (which finishes any remaining steps).
    ``mirror``: attack (and measure) the mirror-invariant distance (``hflip``).
    """

    def __init__(
        self,
        references: Tensor,
        candidates: Tensor | None,
        targets: Sequence[Target],
        spec: AttackSpec = AttackSpec(),
        mirror: bool = False,
    ) -> None:
        if not targets:
            raise ValueError("at least one model is needed")
        devices = {_device(t.metric) for t in targets}
        if len(devices) != 1:
            raise ValueError(f"all models must be on one device, got {sorted(map(str, devices))}")
        if candidates is not None and candidates.shape != references.shape:
            raise ValueError(
                f"reference {list(references.shape)} and candidate {list(candidates.shape)} "
                "differ in shape"
            )
        check_pixels(references, "reference")
        if candidates is not None:
            check_pixels(candidates, "candidate")
        self.device = devices.pop()
        self.targets = list(targets)
        self.spec = spec.resolved()
        self.references = references.detach().to(self.device, torch.float32)
        base = self.references if candidates is None else candidates.detach()
        self.candidates = base.to(self.device, torch.float32)
        self.mirror = mirror
        self._objective: LPIPSObjective | None = None
        self._final: Tensor | None = None
        self._run = self._iterate()

    @property
    def rows(self) -> Tensor:
        """The clean candidates tiled once per model: ``[M·N, 3, H, W]``."""
        return self.candidates.repeat(len(self.targets), 1, 1, 1)

    def _iterate(self) -> Iterator[int]:
        s = self.spec
        assert s.epsilon is not None and s.step_size is not None and s.seed is not None
        metrics = [t.metric for t in self.targets]
        self._objective = LPIPSObjective(metrics, self.references, self.mirror)
        gen = torch.Generator().manual_seed(s.seed)
        self._final = self.rows
        for i, x_adv in enumerate(
            pgd_steps(
                self._objective.loss(s.goal),
                self._final,
                norm=s.norm,
                epsilon=s.epsilon,
                steps=s.steps,
                step_size=s.step_size,
                random_start=s.random_start,
                generator=gen,
            )
        ):
            self._final = x_adv
            yield i + 1

    def steps(self) -> Iterator[int]:
        """Run the attack step by step, yielding the number of steps done so far."""
        return self._run

    def results(self) -> list[list[ModelResult]]:
        """``results[n][m]``: pair ``n`` under target ``m``, measured on the quantised 8-bit image."""
        for _ in self._run:
            pass
        assert self._objective is not None and self._final is not None
        s, x = self.spec, self.rows
        assert s.epsilon is not None
        with torch.inference_mode(False), torch.no_grad():
            q = quantize(self._final, x, s.norm, s.epsilon)
            clean = self._objective.distance(x).tolist()
            adv = self._objective.distance(q).tolist()
            raw = self._objective.distance(self._final).tolist()
            linf, l2 = (v.tolist() for v in perturbation_norms(to_levels(q), x))
            q = q.cpu()
        n_pairs = self.references.shape[0]
        out: list[list[ModelResult]] = [[] for _ in range(n_pairs)]
        for m, t in enumerate(self.targets):
            for n in range(n_pairs):
                i = m * n_pairs + n
                out[n].append(
                    ModelResult(t.name, t.threshold, clean[i], adv[i], raw[i], linf[i], l2[i], q[i])
                )
        return out


def robustness_check(
    reference: Tensor,
    candidate: Tensor | None,
    targets: Sequence[Target],
    spec: AttackSpec = AttackSpec(),
    on_step: Callable[[int], None] | None = None,
) -> tuple[AttackSpec, list[ModelResult]]:
    """One complete check: ``reference`` (and optional ``candidate``) ``[3, H, W]`` in [0, 1] attacked
    under every target. Returns the effective attack parameters and one result per target, in order;
    ``on_step(k)`` is called after each PGD step (progress, cancellation by raising)."""
    refs = reference[None] if reference.ndim == 3 else reference
    cands = None if candidate is None else (candidate[None] if candidate.ndim == 3 else candidate)
    if refs.shape[0] != 1:
        raise ValueError(f"expected one reference [3, H, W], got {list(reference.shape)}")
    job = RobustnessJob(refs, cands, targets, spec)
    for k in job.steps():
        if on_step is not None:
            on_step(k)
    return job.spec, job.results()[0]


def load_targets(
    store: ModelStore,
    names: Sequence[str],
    device: str | torch.device = "cpu",
    skip_unavailable: bool = False,
) -> tuple[list[Target], dict[str, str]]:
    """``names`` as targets at their store thresholds, sharing one trunk object per trunk file (so a
    batched attack makes one trunk pass for all of them); see :meth:`ModelStore.load_shared` for
    ``skip_unavailable`` and the returned ``skipped`` (name → reason)."""
    metrics, skipped = store.load_shared(names, device, skip_unavailable)
    return [Target(n, m, store.model(n).threshold) for n, m in metrics.items()], skipped
