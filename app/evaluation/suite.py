"""The whole evaluation suite for a list of models (``rlpips evaluate card``): one JSON-ready report.

Every model (store name or bundle path) and the PDQ hash (``"pdq"``) meets the same data: objective 2AFC
triplets (64×64 patches of the test sources) under APGD / Square; near-duplicate positives (benign
edits) and negatives (all cross-source pairs) at the service's resolution; evasion / impersonation at
each model's threshold; rank agreement and layer shares over clean distortion pairs.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from app.evaluation import agreement, data, neardup
from app.evaluation.scorers import PDQ, LPIPSScorer, PDQScorer, Scorer
from app.evaluation.twoafc import AttackSpec, evaluate_2afc
from app.metric.store import BASELINE_MODEL, ModelStore
from app.training.model import load_metric

log = logging.getLogger(__name__)
PARTS = ("2afc", "neardup", "attacks", "agreement")


def default_attacks(
    steps: int = 100, restarts: int = 3, queries: int = 1000, other_steps: int | None = None
) -> list[AttackSpec]:
    """The field's standard set: APGD-``steps`` × ``restarts`` on the reference at L∞ 4/255; APGD with
    ``other_steps`` (default ``steps``) × 1 at L∞ 8/255, L2 1.0 and 3.0 on the reference and at L∞ 4/255
    on a candidate (the closer one, pushed away); Square (black-box) at L∞ 4/255 on the reference."""
    k = steps if other_steps is None else other_steps
    return [
        AttackSpec("apgd", "linf", 4 / 255, "ref", steps, restarts),
        AttackSpec("apgd", "linf", 4 / 255, "right", k, 1),
        AttackSpec("apgd", "linf", 8 / 255, "ref", k, 1),
        AttackSpec("apgd", "l2", 1.0, "ref", k, 1),
        AttackSpec("apgd", "l2", 3.0, "ref", k, 1),
        AttackSpec("square", "linf", 4 / 255, "ref", queries=queries),
    ]


@dataclass
class SuiteConfig:
    models: list[str]
    parts: tuple[str, ...] = PARTS
    triplets: int = 200
    patch: int = 64
    attacks: list[AttackSpec] = field(default_factory=default_attacks)
    resolution: int = 256
    images: int | None = None  # first N evaluation images (None: all 124)
    edits: list[str] = field(default_factory=lambda: list(data.EDITS))
    negative_views: int = 4
    mirror: bool = True  # also near-duplicates with the mirror invariance on
    attack_pairs: int = 32
    attack_steps: int = 50
    attack_restarts: int = 1
    attack_queries: int = 500
    attack_epsilon: float = 8 / 255
    distortions_per_image: int = 3
    seed: int = 0


def make_scorer(name: str, store: ModelStore) -> Scorer:
    """``"pdq"`` or a model: a store name (its manifest threshold) or a bundle path (threshold from
    ``name@THRESHOLD``, else NaN)."""
    if name == PDQ:
        return PDQScorer()
    spec, _, thr = name.partition("@")
    metric = load_metric(spec, store)
    for p in metric.parameters():
        p.requires_grad_(False)
    threshold = (
        float(thr)
        if thr
        else (store.manifest.models[spec].threshold if spec in store.names else float("nan"))
    )
    return LPIPSScorer(name, metric, threshold)


def _agreement(scorers: dict[str, Scorer], x: Tensor, y: Tensor) -> dict[str, dict[str, Any]]:
    ref = {
        "pixel_l2": agreement.pixel_l2(x, y).double(),
        "1-ssim": 1 - agreement.ssim(x, y).double(),
    }
    dist: dict[str, Tensor] = {}
    out: dict[str, dict[str, Any]] = {}
    for name, s in scorers.items():
        d, per_layer = agreement.pair_distances(s, x, y)
        dist[name] = d
        out[name] = {
            "layer_shares": agreement.layer_shares(per_layer) if per_layer is not None else None
        }
    base = dist.get(BASELINE_MODEL)
    for name, d in dist.items():
        out[name]["spearman"] = {
            BASELINE_MODEL: agreement.spearman(d, base) if base is not None else float("nan"),
            **{k: agreement.spearman(d, v) for k, v in ref.items()},
        }
    return out


def run_suite(
    cfg: SuiteConfig,
    store: ModelStore,
    command: str = "",
    progress: bool = True,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the selected ``cfg.parts`` for every model; the report (see the README for its fields).
    ``checkpoint(report)`` is called after each part (e.g. to save what is done so far)."""

    def done(part: str) -> None:
        report["meta"]["parts_done"].append(part)
        report["meta"]["elapsed_s"] = round(time.time() - t0, 1)
        if checkpoint is not None:
            checkpoint(report)

    t0 = time.time()
    names = list(cfg.models)
    scorers = {n: make_scorer(n, store) for n in names}  # fail before any work
    files = data.eval_files()
    if cfg.images is not None:
        files = files[: cfg.images]
    report: dict[str, Any] = {
        "meta": {
            "command": command,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": {**asdict(cfg), "attacks": [asdict(a) for a in cfg.attacks]},
            "eval_images": {"count": len(files), "imagenet_test_split": sum(p.parent == data.IMAGENET for p in files),
                            "kodak": sum(p.parent == data.KODAK for p in files),
                            "split": "imagenet-sample test split of split_sources(1000, seed 0, 0.8/0.1/0.1) + kodak24"},
            "torch_threads": torch.get_num_threads(),
            "parts_done": [],
            "finished": False,
        },
        "models": {n: {"kind": "hash" if n == PDQ else "lpips", "threshold": s.threshold} for n, s in scorers.items()},
    }  # fmt: skip
    models = report["models"]
    if "neardup" in cfg.parts or "attacks" in cfg.parts:
        orig, edited, edit_names = data.edited_pairs(files, cfg.edits, cfg.resolution)
    if "neardup" in cfg.parts:
        views, groups = data.crop_views(files, cfg.resolution, cfg.negative_views)
        report["meta"]["negatives"] = {
            "views_per_image": cfg.negative_views,
            "images": len(views),
            "pairs": "all pairs of views of different sources",
        }
        for n, s in scorers.items():
            log.info("near-duplicate ROC for %s", n)
            pos = neardup.positive_distances(s, orig, edited)
            neg = neardup.negative_distances(s, views, groups)
            models[n]["neardup"] = neardup.detection_report(pos, edit_names, neg, s.threshold)
            if cfg.mirror:  # the same with the service's mirror invariance (issue 13 item 3)
                pos = neardup.positive_distances(s, orig, edited, mirror=True)
                neg = neardup.negative_distances(s, views, groups, mirror=True)
                report_m = neardup.detection_report(pos, edit_names, neg, s.threshold)
                models[n]["neardup_mirror"] = report_m
        done("neardup")
    if "attacks" in cfg.parts:
        k = min(cfg.attack_pairs, len(orig))
        e = cfg.edits.index(data.MILD_EDIT)
        mild = edited[e :: len(cfg.edits)][:k]
        for n, s in scorers.items():
            other = torch.roll(orig[:k], 1, 0)
            for key, goal, cand in (
                ("evasion", "evade", mild),
                ("impersonation", "impersonate", other),
            ):
                models[n][key] = neardup.attack_pairs(
                    s, orig[:k], cand, goal=goal, norm="linf", epsilon=cfg.attack_epsilon,
                    steps=cfg.attack_steps, restarts=cfg.attack_restarts, queries=cfg.attack_queries,
                    seed=cfg.seed, progress=progress,
                )  # fmt: skip
            done(f"attacks:{n}")
    if "agreement" in cfg.parts:
        x = data.load_images(files, cfg.resolution)
        y, _ = data.distortion_pairs(x, cfg.distortions_per_image, cfg.seed)
        xs = x.repeat_interleave(cfg.distortions_per_image, dim=0)
        extra = (
            {}
            if BASELINE_MODEL in scorers
            else {BASELINE_MODEL: make_scorer(BASELINE_MODEL, store)}
        )
        agree = _agreement({**scorers, **extra}, xs, y)
        report["meta"]["agreement_pairs"] = len(y)
        for n in scorers:
            models[n]["agreement"] = agree[n]
        done("agreement")
    if "2afc" in cfg.parts:
        trip = data.objective_triplets(cfg.triplets, patch=cfg.patch)
        report["meta"]["triplets"] = {
            "n": len(trip),
            "patch": cfg.patch,
            "sources": len(set(trip.source.tolist())),
        }
        for n, s in scorers.items():
            specs = [a for a in cfg.attacks if s.differentiable or a.method == "square"]
            models[n]["2afc"] = evaluate_2afc(s, trip, specs, progress=progress)
            done(f"2afc:{n}")
    report["meta"]["finished"] = True
    report["meta"]["elapsed_s"] = round(time.time() - t0, 1)
    return report
