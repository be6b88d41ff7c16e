"""The R-LPIPS paper's ImageNet robustness experiment (``rlpips evaluate imagenet-attack``).

For each image ``x`` (resized to N×N, in [0, 1]) an untargeted PGD attack maximises the MSE between the
*trunk features* of a target model at ``x_adv`` and at ``x`` (no heads involved); then ``d(x, x_adv)`` is
recorded under LPIPS and each robust model. A histogram (PNG) and a JSON summary go to ``docs/``.
Heads-only R-LPIPS variants share the target's trunk, so they are all scored on the same ``x_adv``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from app.attacks.pgd import Norm, perturbation_norms, pgd
from app.attacks.robustness import LPIPSObjective, Target, feature_mse_loss, load_targets
from app.imaging import load_tensor, to_unit
from app.metric.store import BASELINE_MODEL, ModelStore

log = logging.getLogger(__name__)

IMAGES = Path(__file__).resolve().parents[3] / "shared" / "images" / "imagenet-sample"
#: The paper's radii in [0, 1]-pixel units.
EPSILON: dict[Norm, float] = {"linf": 0.05, "l2": 1.0}
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def image_files(folder: Path, limit: int | None) -> list[Path]:
    """The first ``limit`` images of ``folder`` in name order (JPEG/PNG)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    return files[:limit] if limit else files


def default_models(store: ModelStore) -> list[str]:
    """``lpips-alex`` and every robust (``r-lpips-*``) model the store names."""
    return [BASELINE_MODEL] + [n for n in store.names if n.startswith("r-lpips")]


def attack_images(
    files: Sequence[Path],
    target: Target,
    scored: Sequence[Target],
    *,
    norm: Norm,
    epsilon: float,
    steps: int,
    step_size: float,
    random_start: bool,
    seed: int,
    resolution: int,
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, list[float]], list[float]]:
    """Attack the target's trunk features on every image; ``d(x, x_adv)`` per scored model, and the
    measured perturbation norm (in the attack's norm) per image."""
    gen = torch.Generator().manual_seed(seed)
    dist: dict[str, list[float]] = {t.name: [] for t in scored}
    norms: list[float] = []
    with tqdm(total=len(files), unit="img", desc="imagenet-attack") as bar:
        for i in range(0, len(files), batch_size):
            chunk = files[i : i + batch_size]
            x = torch.stack([to_unit(load_tensor(p.read_bytes(), resolution)) for p in chunk])
            x = x.to(device)
            x_adv = pgd(
                feature_mse_loss(target.metric.trunk, x),
                x,
                norm=norm,
                epsilon=epsilon,
                steps=steps,
                step_size=step_size,
                random_start=random_start,
                generator=gen,
            )
            with torch.no_grad():
                objective = LPIPSObjective([t.metric for t in scored], x)
                d = objective.distance(x_adv.repeat(len(scored), 1, 1, 1)).view(len(scored), -1)
            for t, row in zip(scored, d.tolist(), strict=True):
                dist[t.name].extend(row)
            linf, l2 = perturbation_norms(x_adv, x)
            norms.extend((linf if norm == "linf" else l2).tolist())
            bar.update(len(chunk))
    return dist, norms


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, median, standard deviation, extremes and quantiles of ``values``."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
        "quantiles": {f"{q:g}": float(np.quantile(a, q)) for q in QUANTILES},
    }


def plot_histogram(
    dist: dict[str, list[float]],
    title: str,
    path: Path,
    shares_trunk: dict[str, bool],
    skipped: Sequence[str] = (),
) -> None:
    """Overlaid step histograms of ``d(x, x_adv)`` per model on shared bins; models that do not share
    the attacked trunk are marked "transfer", skipped models are listed under the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = np.concatenate([np.asarray(v) for v in dist.values()])
    bins = np.linspace(0.0, float(everything.max()) * 1.02 + 1e-9, 40).tolist()
    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=110)
    for name, values in dist.items():
        kind = "" if shares_trunk[name] else ", transfer"
        label = f"{name} (median {np.median(values):.3f}{kind})"
        ax.hist(values, bins=bins, histtype="step", linewidth=1.6, label=label)
    ax.set_xlabel("d(x, x_adv)")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    if skipped:
        note = "skipped (weights unavailable): " + ", ".join(skipped)
        fig.text(0.01, 0.01, note, fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05 if skipped else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class Experiment:
    """One run: ``models`` scored on images of ``images`` (the first ``limit``) attacked on the
    ``target``'s trunk features at ``resolution``² with the given PGD."""

    images: Path
    limit: int | None
    target: str
    models: list[str]
    norm: Norm
    epsilon: float
    steps: int
    step_size: float
    random_start: bool
    seed: int
    resolution: int
    batch_size: int


def run_experiment(
    store: ModelStore, exp: Experiment, device: torch.device, command: str
) -> dict[str, Any]:
    """Load the models, attack the images, and return the JSON summary (see the module docstring);
    ``command`` is recorded as the way to reproduce it."""
    loaded, skipped = load_targets(store, [exp.target, *exp.models], device, skip_unavailable=True)
    by_name = {t.name: t for t in loaded}
    if exp.target not in by_name:
        raise ValueError(f"target model {exp.target} is unavailable: {skipped[exp.target]}")
    files = image_files(exp.images, exp.limit)
    attack = {
        "norm": exp.norm,
        "epsilon": exp.epsilon,
        "steps": exp.steps,
        "step_size": exp.step_size,
        "random_start": exp.random_start,
        "seed": exp.seed,
    }
    started = time.perf_counter()
    dist, norms = attack_images(
        files,
        by_name[exp.target],
        [by_name[n] for n in dict.fromkeys(exp.models) if n in by_name],
        norm=exp.norm,
        epsilon=exp.epsilon,
        steps=exp.steps,
        step_size=exp.step_size,
        random_start=exp.random_start,
        seed=exp.seed,
        resolution=exp.resolution,
        batch_size=exp.batch_size,
        device=device,
    )
    target_file = store.model(exp.target).trunk.file
    return {
        "command": command,
        "experiment": "untargeted PGD on the target's trunk features (maximise feature MSE to the "
        "clean image), then d(x, x_adv) under each model",
        "target": exp.target,
        "attack": attack,
        "resolution": [exp.resolution, exp.resolution],
        "images": {
            "folder": str(exp.images),
            "count": len(files),
            "files": [p.name for p in files],
        },
        "device": str(device),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "perturbation": stats(norms),
        "models": {
            name: {**stats(v), "shares_target_trunk": store.model(name).trunk.file == target_file}
            for name, v in dist.items()
        },
        "skipped": {name: reason for name, reason in skipped.items() if name in exp.models},
        "distances": dist,
    }


def write_report(summary: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``OUT.json`` (the summary) and ``OUT.png`` (the histogram); returns both paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    a, r = summary["attack"], summary["resolution"][0]
    title = (
        f"PGD-{a['norm']} eps={a['epsilon']:g}, {a['steps']} steps on {summary['target']} trunk "
        f"features, {summary['images']['count']} ImageNet images at {r}px"
    )
    shares = {name: s["shares_target_trunk"] for name, s in summary["models"].items()}
    plot_histogram(summary["distances"], title, png_path, shares, list(summary["skipped"]))
    return json_path, png_path
