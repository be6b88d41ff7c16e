"""Bounded, resumable, deterministic fine-tuning of an LPIPS trunk and heads with :mod:`robust`'s objective.

The student is a copy of the teacher (trunk unfrozen, heads trainable and clamped ≥ 0 after every step);
Adam with two learning rates (trunk ``lr``, heads ``head_lr``), constant then linearly decayed. Step ``k``'s
data and attack starts are functions of ``(seed, k)`` only, so a run resumed from ``OUT/checkpoint.pt``
ends with exactly the weights of an uninterrupted one. ``OUT/log.jsonl`` gets the loss terms every
``log_every`` steps; :func:`export` writes the trunk and heads as a safetensors bundle.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from app.metric.loaders import save_bundle
from app.metric.lpips import LPIPS
from app.training.robust import RobustConfig, SourcePool, draw_batch, robust_loss

log = logging.getLogger(__name__)

StepHook = Callable[[int, LPIPS], dict[str, float]]


def make_student(teacher: LPIPS) -> LPIPS:
    """A trainable deep copy of ``teacher`` (trunk parameters and heads require gradients)."""
    student = copy.deepcopy(teacher)
    student.trunk.unfreeze()
    for w in student.heads.weights:
        w.requires_grad_(True)
    return student


def make_optimizer(student: LPIPS, cfg: RobustConfig) -> torch.optim.Adam:
    return torch.optim.Adam(
        [
            {"params": list(student.trunk.parameters()), "lr": cfg.lr, "base_lr": cfg.lr},
            {"params": list(student.heads.parameters()), "lr": cfg.head_lr, "base_lr": cfg.head_lr},
        ],
        betas=(0.9, 0.999),
    )


def _config_dict(cfg: RobustConfig) -> dict[str, object]:
    out: dict[str, object] = json.loads(json.dumps(asdict(cfg)))
    return out


@dataclass
class FineTuner:
    """Runs ``cfg`` on ``pool`` from ``teacher``; checkpoints to ``out/checkpoint.pt``."""

    cfg: RobustConfig
    pool: SourcePool
    out: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    save_every: int = 50
    log_every: int = 10
    progress: bool = True
    on_log: StepHook | None = None

    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self, student: LPIPS, opt: torch.optim.Optimizer, step: int) -> None:
        state = {
            "config": _config_dict(self.cfg),
            "model": student.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
        }
        tmp = self.checkpoint_path().with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path())

    def resume(self, student: LPIPS, opt: torch.optim.Optimizer) -> int:
        """Load the checkpoint if there is one; the step to continue from (0 without one).

        Only ``steps`` may differ from the saved configuration (to extend a run)."""
        path = self.checkpoint_path()
        if not path.is_file():
            return 0
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved, want = dict(state["config"]), _config_dict(self.cfg)
        if {k: v for k, v in saved.items() if k != "steps"} != {
            k: v for k, v in want.items() if k != "steps"
        }:
            raise ValueError(
                f"{path} was written by a different configuration: {saved}; "
                "use another --out folder or the same options"
            )
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        log.info("resuming from step %d", state["step"])
        return int(state["step"])

    def run(self, teacher: LPIPS, stop_after: int | None = None) -> LPIPS:
        """Train to ``cfg.steps`` (or stop after ``stop_after`` more steps, for tests and time
        slices); returns the student."""
        self.out.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        teacher = teacher.to(self.device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        student = make_student(teacher)
        opt = make_optimizer(student, cfg)
        start = self.resume(student, opt)
        end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
        sums: dict[str, float] = {}
        t0 = time.monotonic()
        bar = tqdm(range(start, end), desc="finetune", disable=not self.progress,
                   initial=start, total=cfg.steps)  # fmt: skip
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * cfg.lr_factor(step)
            batch = draw_batch(self.pool, cfg, step)
            batch = batch.to(self.device)
            g = torch.Generator().manual_seed(cfg.seed * 7_919 + step)  # CPU: same starts anywhere
            loss, terms = robust_loss(student, teacher, batch, cfg, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            student.heads.clamp_()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{terms['loss']:.4f}", adv=f"{terms['adv']:.3f}")
            done = step + 1
            if done % self.log_every == 0 or done == end:
                self._log(student, done, sums, time.monotonic() - t0)
                sums = {}
            if done % self.save_every == 0 or done == end:
                self.save(student, opt, done)
        return student

    def _log(self, student: LPIPS, step: int, sums: dict[str, float], seconds: float) -> None:
        n = max(1, step % self.log_every or self.log_every)
        record: dict[str, float] = {"step": step, "seconds": round(seconds, 1)}
        record |= {k: v / n for k, v in sums.items()}
        if self.on_log is not None:
            record |= self.on_log(step, student)
        log.info("step %s", record)
        with (self.out / "log.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def export(student: LPIPS, path: Path, metadata: dict[str, str]) -> None:
    """Write the fine-tuned trunk and heads as a safetensors bundle (``trunk.features.*`` + heads)."""
    save_bundle(
        path,
        [w.detach() for w in student.heads.weights],
        student.trunk.state_dict(),
        metadata,
    )
