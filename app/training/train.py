"""Adversarial 2AFC training of R-LPIPS heads (and optionally the trunk).

Recipe (Ghazanfari et al. 2023, after LPIPS' training): heads from scratch, BCE of the ranking network
``G(d0, d1)`` against ``h``, Adam (lr 1e-4, β1 0.5), batch 50, a constant then a linearly decayed phase,
heads clamped ≥ 0 after every step. Each batch is first attacked with PGD (default L∞ 4/255 px on p0)
maximising the ranking loss *of the network being trained*; perturbed images are kept in ``[0, 1]``;
in ``p0`` mode only p0 is perturbed. Training is deterministic given the seed, and resumable: the
checkpoint stores the epoch and batch to continue from (batch order and attack starts derive from the seed).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm import tqdm

from app.attacks.pgd import Norm, default_step_size, pgd
from app.metric.loaders import save_bundle
from app.metric.lpips import Heads
from app.metric.trunks import Trunk
from app.training.datasets import TripletSet
from app.training.model import Mode, TwoAFCModel, random_heads, two_afc_score

log = logging.getLogger(__name__)

Target = Literal["none", "p0", "p1", "ref", "p0+p1"]
TARGETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "p0": ("p0",),
    "p1": ("p1",),
    "ref": ("ref",),
    "p0+p1": ("p0", "p1"),
}
ROLES = ("ref", "p0", "p1")
Feats = list[Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved in checkpoints and bundles)."""

    mode: Mode = "heads"
    attack: Target = "p0"
    norm: Norm = "linf"
    epsilon: float = 4 / 255
    attack_steps: int = 10
    step_size: float | None = None
    lr: float = 1e-4
    beta1: float = 0.5
    batch_size: int = 50
    epochs: int = 5
    epochs_decay: int = 5
    seed: int = 0

    @property
    def effective_step_size(self) -> float:
        if self.step_size is not None:
            return self.step_size
        return default_step_size(self.norm, self.epsilon, max(1, self.attack_steps))

    def lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """1 during the constant epochs, then linear to 0 over the decay epochs (per step)."""
        const = self.epochs * steps_per_epoch
        decay = self.epochs_decay * steps_per_epoch
        if step < const or decay == 0:
            return 1.0
        return max(0.0, 1.0 - (step - const) / decay)


def attack_batch(
    model: TwoAFCModel,
    images: dict[str, Tensor],
    clean: dict[str, Feats],
    h: Tensor,
    cfg: TrainConfig,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """PGD on the roles named by ``cfg.attack``, maximising ``model``'s own ranking loss.

    ``images``: ``ref``/``p0``/``p1`` ``[N, 3, H, W]`` in ``[0, 1]``; ``clean``: their features.
    Returns the images with the attacked roles replaced (still in ``[0, 1]``, within ε).
    """
    roles = TARGETS[cfg.attack]
    if not roles or cfg.attack_steps == 0:
        return images
    n = h.shape[0]

    def loss_fn(x: Tensor) -> Tensor:
        f = model.features(x)
        feats = dict(clean)
        for k, r in enumerate(roles):
            feats[r] = [t[k * n : (k + 1) * n] for t in f]
        d0 = model.distance(feats["ref"], feats["p0"])
        d1 = model.distance(feats["ref"], feats["p1"])
        return model.loss(d0, d1, h).repeat(len(roles))

    x_adv = pgd(
        loss_fn, torch.cat([images[r] for r in roles]), norm=cfg.norm, epsilon=cfg.epsilon,
        steps=cfg.attack_steps, step_size=cfg.effective_step_size, generator=generator,
    )  # fmt: skip
    out = dict(images)
    for k, r in enumerate(roles):
        out[r] = x_adv[k * n : (k + 1) * n]
    return out


@dataclass
class StepStats:
    loss: float
    clean_acc: float
    adv_acc: float


def train_step(
    model: TwoAFCModel,
    opt: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    h: Tensor,
    cfg: TrainConfig,
    generator: torch.Generator,
) -> StepStats:
    """Attack the batch, then one optimiser step on the adversarial triplets; heads clamped ≥ 0."""
    n = h.shape[0]
    with torch.no_grad():
        f = model.features(torch.cat([batch[r] for r in ROLES]))
        clean = {r: [t[k * n : (k + 1) * n] for t in f] for k, r in enumerate(ROLES)}
        clean_acc = two_afc_score(
            model.distance(clean["ref"], clean["p0"]), model.distance(clean["ref"], clean["p1"]), h
        )
    adv = attack_batch(model, batch, clean, h, cfg, generator)
    if model.mode == "heads":  # frozen trunk: reuse clean features, no trunk graph needed
        feats = dict(clean)
        with torch.no_grad():
            for r in TARGETS[cfg.attack]:
                feats[r] = model.features(adv[r])
        d0 = model.distance(feats["ref"], feats["p0"])
        d1 = model.distance(feats["ref"], feats["p1"])
        loss = model.loss(d0, d1, h)
    else:
        loss, d0, d1 = model.triplet_loss(adv["ref"], adv["p0"], adv["p1"], h)
    opt.zero_grad(set_to_none=True)
    loss.mean().backward()  # type: ignore[no-untyped-call]
    opt.step()
    model.clamp_()
    adv_acc = two_afc_score(d0.detach(), d1.detach(), h)
    return StepStats(float(loss.detach().mean()), float(clean_acc.mean()), float(adv_acc.mean()))


def build_model(trunk: Trunk, cfg: TrainConfig) -> TwoAFCModel:
    """Fresh heads and ranking network, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    heads = random_heads(trunk.spec.channels, torch.Generator().manual_seed(cfg.seed))
    return TwoAFCModel(trunk, heads, cfg.mode)


def make_optimizer(model: TwoAFCModel, cfg: TrainConfig) -> torch.optim.Adam:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, 0.999))


def batch_order(n: int, cfg: TrainConfig, epoch: int) -> list[Tensor]:
    """The shuffled batches of ``epoch`` (a function of seed and epoch only, so resumes reproduce)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return [perm[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]


EpochHook = Callable[[int, TwoAFCModel], dict[str, float]]


@dataclass
class Trainer:
    """Runs :class:`TrainConfig` on ``data``, checkpointing to ``out/checkpoint.pt``."""

    cfg: TrainConfig
    data: TripletSet
    out: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    save_every: int = 200
    progress: bool = True
    on_epoch: EpochHook | None = None

    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self, model: TwoAFCModel, opt: torch.optim.Optimizer, epoch: int, batch: int) -> None:
        state = {
            "config": asdict(self.cfg),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "batch": batch,
        }
        tmp = self.checkpoint_path().with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path())

    def resume(self, model: TwoAFCModel, opt: torch.optim.Optimizer) -> tuple[int, int]:
        """Load the checkpoint if there is one; ``(epoch, batch)`` to continue from."""
        path = self.checkpoint_path()
        if not path.is_file():
            return 0, 0
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state["config"] != json.loads(json.dumps(asdict(self.cfg))):
            raise ValueError(
                f"{path} was written by a different configuration: {state['config']}; "
                "use another --out folder or the same options"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        log.info("resuming from epoch %d batch %d", state["epoch"], state["batch"])
        return int(state["epoch"]), int(state["batch"])

    def run(self, trunk: Trunk) -> TwoAFCModel:
        """Train to the end (or from the checkpoint on); returns the trained model."""
        self.out.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        model = build_model(trunk, cfg).to(self.device)
        opt = make_optimizer(model, cfg)
        epoch0, batch0 = self.resume(model, opt)
        n_batches = len(batch_order(len(self.data), cfg, 0))
        for epoch in range(epoch0, cfg.epochs + cfg.epochs_decay):
            self._epoch(model, opt, epoch, batch0 if epoch == epoch0 else 0, n_batches)
        return model

    def _epoch(
        self, model: TwoAFCModel, opt: torch.optim.Optimizer, epoch: int, start: int, n_batches: int
    ) -> None:
        cfg = self.cfg
        batches = batch_order(len(self.data), cfg, epoch)
        sums = StepStats(0.0, 0.0, 0.0)
        done = 0
        t0 = time.monotonic()
        bar = tqdm(
            range(start, len(batches)), desc=f"epoch {epoch + 1}/{cfg.epochs + cfg.epochs_decay}",
            disable=not self.progress, initial=start, total=len(batches),
        )  # fmt: skip
        for b in bar:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * cfg.lr_factor(epoch * n_batches + b, n_batches)
            idx = batches[b]
            ref, p0, p1 = (t.to(self.device) for t in self.data.images(idx))
            h = self.data.h[idx].to(self.device)
            g = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch * 100_003 + b)
            st = train_step(model, opt, {"ref": ref, "p0": p0, "p1": p1}, h, cfg, g)
            done += 1
            sums = StepStats(
                sums.loss + st.loss, sums.clean_acc + st.clean_acc, sums.adv_acc + st.adv_acc
            )
            bar.set_postfix(loss=f"{sums.loss / done:.4f}", acc=f"{sums.clean_acc / done:.3f}",
                            adv_acc=f"{sums.adv_acc / done:.3f}")  # fmt: skip
            if (b + 1) % self.save_every == 0 and b + 1 < len(batches):
                self.save(model, opt, epoch, b + 1)
        self.save(model, opt, epoch + 1, 0)
        record: dict[str, float] = {"epoch": epoch + 1, "seconds": round(time.monotonic() - t0, 1)}
        if done:
            record |= {"loss": sums.loss / done, "train_clean_acc": sums.clean_acc / done,
                       "train_adv_acc": sums.adv_acc / done}  # fmt: skip
        if self.on_epoch is not None:
            record |= self.on_epoch(epoch + 1, model)
        log.info("epoch %s", record)
        with (self.out / "log.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def export(model: TwoAFCModel, path: Path, metadata: dict[str, str]) -> None:
    """Write the trained heads (and, in ``tune`` mode, the trunk) as a safetensors bundle."""
    heads: Heads = model.metric.heads
    trunk = model.metric.trunk.state_dict() if model.mode == "tune" else None
    save_bundle(path, [w.detach() for w in heads.weights], trunk, metadata)
