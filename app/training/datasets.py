"""2AFC triplet data: a BAPPS folder reader and a synthetic generator from natural images.

A 2AFC triplet is a reference patch, two distorted patches ``p0``/``p1`` and a judgment ``h`` in
``[0, 1]``: the fraction of judges who found ``p1`` closer to the reference (BAPPS' ``judge``), so a
metric is right when ``d(ref, p1) < d(ref, p0)`` for ``h > 0.5``. Patches are kept as ``uint8``
``[N, 3, H, W]``; :meth:`TripletSet.images` returns float ``[0, 1]``.

Synthetic labels are honest about their origin (``kind``): *objective* when ``p0`` and ``p1`` are the same
distortion draw at two severities (the less severe one is closer, by construction), *teacher* when they are
different distortions labelled by a teacher metric (LPIPS v0.1) whose verdict clears a confidence margin.
Splits are disjoint by source image and everything is deterministic given the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm import tqdm

from app.metric.store import BASELINE_MODEL
from app.training import distortions

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
KINDS = ("objective", "teacher", "human")
OBJECTIVE, TEACHER, HUMAN = 0, 1, 2
#: Bumped whenever generation changes, so stale caches are never reused.
GENERATOR_VERSION = 2
#: A teacher: distances ``[N]`` between image batches ``[N, 3, H, W]`` in ``[-1, 1]``.
Teacher = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TripletSet:
    """``ref``/``p0``/``p1`` uint8 ``[N, 3, H, W]``; ``h`` float ``[N]`` (1 = p1 closer); ``kind`` and
    ``source`` (source-image index, -1 unknown) int64 ``[N]``; ``severity`` float ``[N, 2]``, the
    synthetic severities of p0 and p1 (NaN when unknown); ``names`` the distortions per triplet."""

    ref: Tensor
    p0: Tensor
    p1: Tensor
    h: Tensor
    kind: Tensor
    source: Tensor
    severity: Tensor
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.ref.shape[0]
        for name in ("ref", "p0", "p1"):
            t = getattr(self, name)
            if (
                t.dtype != torch.uint8
                or t.ndim != 4
                or t.shape[1] != 3
                or t.shape != self.ref.shape
            ):
                raise ValueError(
                    f"{name} must be uint8 [N, 3, H, W] like ref, got {t.dtype} {list(t.shape)}"
                )
        for name in ("h", "kind", "source"):
            if getattr(self, name).shape != (n,):
                raise ValueError(
                    f"{name} must have shape [{n}], got {list(getattr(self, name).shape)}"
                )
        if self.severity.shape != (n, 2):
            raise ValueError(f"severity must have shape [{n}, 2], got {list(self.severity.shape)}")
        if n and (self.h.min() < 0 or self.h.max() > 1):
            raise ValueError("judgments h must lie in [0, 1]")
        if len(self.names) != n:
            raise ValueError(f"names has {len(self.names)} entries for {n} triplets")

    def __len__(self) -> int:
        return int(self.ref.shape[0])

    def subset(self, idx: Tensor | Sequence[int]) -> TripletSet:
        """The triplets at positions ``idx``, in that order."""
        i = torch.as_tensor(idx, dtype=torch.long)
        return TripletSet(
            self.ref[i], self.p0[i], self.p1[i], self.h[i], self.kind[i], self.source[i],
            self.severity[i], [self.names[int(k)] for k in i],
        )  # fmt: skip

    def images(self, idx: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(ref, p0, p1)`` as float ``[n, 3, H, W]`` in ``[0, 1]`` (all triplets, or those at ``idx``)."""
        sel = slice(None) if idx is None else idx
        return tuple(t[sel].float() / 255.0 for t in (self.ref, self.p0, self.p1))  # type: ignore[return-value]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(asdict(self), tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> TripletSet:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


# -- BAPPS -------------------------------------------------------------------------------------


def _read_rgb(path: Path, size: int | None) -> Tensor:
    img = Image.open(path).convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def read_bapps(
    roots: Sequence[Path], size: int | None = 64, limit: int | None = None
) -> TripletSet:
    """Read BAPPS 2AFC folders (``ref/``, ``p0/``, ``p1/`` images and ``judge/*.npy``), in name order.

    ``size`` resizes patches to ``size``×``size`` (``None`` keeps them; then all must be equal).
    """
    refs: list[Tensor] = []
    p0s: list[Tensor] = []
    p1s: list[Tensor] = []
    hs: list[float] = []
    names: list[str] = []
    for root in roots:
        if not (root / "ref").is_dir() or not (root / "judge").is_dir():
            raise FileNotFoundError(
                f"{root} is not a BAPPS 2AFC folder (needs ref/, p0/, p1/, judge/)"
            )
        files = sorted(p for p in (root / "ref").iterdir() if p.suffix.lower() in {".png", ".jpg"})
        if not files:
            raise FileNotFoundError(f"{root / 'ref'} holds no images")
        for f in files[: None if limit is None else max(0, limit - len(refs))]:
            refs.append(_read_rgb(f, size))
            p0s.append(_read_rgb(root / "p0" / f.name, size))
            p1s.append(_read_rgb(root / "p1" / f.name, size))
            hs.append(float(np.load(root / "judge" / f"{f.stem}.npy").reshape(-1)[0]))
            names.append(f"{root.name}/{f.stem}")
    n = len(refs)
    return TripletSet(
        torch.stack(refs), torch.stack(p0s), torch.stack(p1s), torch.tensor(hs, dtype=torch.float32),
        torch.full((n,), HUMAN), torch.full((n,), -1), torch.full((n, 2), float("nan")), names,
    )  # fmt: skip


# -- synthetic ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    """How a synthetic 2AFC set is drawn; its :meth:`key` names the cache folder."""

    images_dir: str
    seed: int = 0
    sizes: tuple[int, int, int] = (20000, 1000, 2000)
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    patch: int = 64
    teacher: str = BASELINE_MODEL
    teacher_fraction: float = 1 / 3
    teacher_margin: float = 0.2
    severity_gap: float = 0.3
    p_compose: float = 0.3
    version: int = GENERATOR_VERSION

    def key(self) -> str:
        blob = json.dumps(
            {**asdict(self), "images_dir": Path(self.images_dir).name}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def source_files(images_dir: Path) -> list[Path]:
    """Every image in ``images_dir``, sorted by name (the source index is the position here)."""
    exts = {".jpg", ".jpeg", ".png"}
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in exts)
    if not files:
        raise FileNotFoundError(f"no images found in {images_dir}")
    return files


def split_sources(
    n: int, seed: int, fractions: tuple[float, float, float]
) -> dict[Split, list[int]]:
    """Partition source indices ``0..n-1`` into disjoint train/val/test lists, deterministically."""
    perm = np.random.default_rng([seed, 7919]).permutation(n).tolist()
    n_train = round(fractions[0] * n)
    n_val = round(fractions[1] * n)
    return {
        "train": sorted(perm[:n_train]),
        "val": sorted(perm[n_train : n_train + n_val]),
        "test": sorted(perm[n_train + n_val :]),
    }


def _to_u8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _patch(img: Image.Image, rng: np.random.Generator, size: int) -> Tensor:
    """A random square crop (side ``size``..3·``size`` px, capped by the image) resized to ``size``."""
    w, h = img.size
    side = min(w, h, int(rng.integers(size, 3 * size + 1)))
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)


#: A candidate pair: ``(p0, p1, h, severities (t0, t1), name)``; ``h`` is -1 until a teacher decides.
Pair = tuple[Tensor, Tensor, float, tuple[float, float], str]


@dataclass
class _Draft:
    """One slot's candidates: objective slots have one, teacher slots up to ``TEACHER_TRIES``."""

    ref: Tensor
    kind: int
    pairs: list[Pair]


TEACHER_TRIES = 4


def _draft(cfg: SynthConfig, img: Image.Image, source: int, j: int) -> _Draft:
    rng = np.random.default_rng([cfg.seed, source, j])
    ref = _patch(img, rng, cfg.patch)
    x = ref.float() / 255.0
    size = (cfg.patch, cfg.patch)
    if rng.random() >= cfg.teacher_fraction:
        name, d = distortions.sample(rng, size, cfg.p_compose)
        lo = rng.uniform(0, 1 - cfg.severity_gap)
        hi = rng.uniform(lo + cfg.severity_gap, 1)
        t0, t1 = (hi, lo) if rng.random() < 0.5 else (lo, hi)
        pair = (_to_u8(d(x, t0)), _to_u8(d(x, t1)), float(t0 > t1), (t0, t1), name)
        return _Draft(ref, OBJECTIVE, [pair])
    pairs = []
    for _ in range(TEACHER_TRIES):
        (na, da), (nb, db) = (distortions.sample(rng, size, cfg.p_compose) for _ in range(2))
        ta, tb = rng.uniform(0, 1, size=2)
        pairs.append((_to_u8(da(x, ta)), _to_u8(db(x, tb)), -1.0, (ta, tb), f"{na} | {nb}"))
    return _Draft(ref, TEACHER, pairs)


def _resolve(
    drafts: list[_Draft], teacher: Teacher | None, margin: float
) -> list[tuple[int, Pair]]:
    """Pick each slot's pair; teacher slots keep the first candidate whose teacher verdict clears
    ``margin`` (relative gap ``|d0 - d1| / max(d0, d1)``) and are dropped when none does."""
    cand = [(i, p) for i, dr in enumerate(drafts) if dr.kind == TEACHER for p in dr.pairs]
    verdict: dict[int, Pair] = {}
    if cand:
        if teacher is None:
            raise ValueError("teacher_fraction > 0 needs a teacher metric")
        ref = torch.stack([drafts[i].ref for i, _ in cand]).float() / 127.5 - 1
        p0 = torch.stack([p[0] for _, p in cand]).float() / 127.5 - 1
        p1 = torch.stack([p[1] for _, p in cand]).float() / 127.5 - 1
        with torch.inference_mode():
            d0, d1 = teacher(ref, p0), teacher(ref, p1)
        gap = (d0 - d1).abs() / torch.maximum(d0, d1).clamp_min(1e-12)
        for k in reversed(range(len(cand))):  # reversed: the first passing candidate wins
            i, p = cand[k]
            if float(gap[k]) >= margin:
                verdict[i] = (p[0], p[1], float(d1[k] < d0[k]), p[3], p[4])
    out = []
    for i, dr in enumerate(drafts):
        if dr.kind == OBJECTIVE:
            out.append((i, dr.pairs[0]))
        elif i in verdict:
            out.append((i, verdict[i]))
    return out


def generate(
    cfg: SynthConfig, split: Split, teacher: Teacher | None = None, progress: bool = False
) -> TripletSet:
    """Draw the ``split`` set of ``cfg`` (``cfg.sizes`` triplets minus dropped teacher slots).

    Triplets are ordered patch-major (the first patch of every source image, then the second, ...), so
    any prefix spans many source images. Runs single-threaded: tiny tensor ops are fastest that way.
    """
    files = source_files(Path(cfg.images_dir))
    sources = split_sources(len(files), cfg.seed, cfg.fractions)[split]
    n = cfg.sizes[SPLITS.index(split)]
    rows: list[tuple[int, int, Tensor, Pair, int, int]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k, s in enumerate(tqdm(sources, desc=f"synth {split}", disable=not progress)):
            count = n // len(sources) + (1 if k < n % len(sources) else 0)
            if count == 0:
                continue
            img = ImageOps.exif_transpose(Image.open(files[s])).convert("RGB")
            drafts = [_draft(cfg, img, s, j) for j in range(count)]
            for j, pair in _resolve(drafts, teacher, cfg.teacher_margin):
                rows.append((j, k, drafts[j].ref, pair, drafts[j].kind, s))
    finally:
        torch.set_num_threads(threads)
    rows.sort(key=lambda r: (r[0], r[1]))
    pairs = [r[3] for r in rows]
    return TripletSet(
        torch.stack([r[2] for r in rows]), torch.stack([p[0] for p in pairs]),
        torch.stack([p[1] for p in pairs]), torch.tensor([p[2] for p in pairs], dtype=torch.float32),
        torch.tensor([r[4] for r in rows], dtype=torch.long), torch.tensor([r[5] for r in rows], dtype=torch.long),
        torch.tensor([p[3] for p in pairs], dtype=torch.float32), [p[4] for p in pairs],
    )  # fmt: skip


def cached_split(
    cfg: SynthConfig,
    split: Split,
    cache_root: Path,
    teacher: Callable[[], Teacher] | None = None,
    progress: bool = False,
) -> TripletSet:
    """``split`` of ``cfg`` from ``cache_root/synth-<key>/``, generated and saved on first use.

    ``teacher`` is a factory, called only when the split has to be generated.
    """
    folder = cache_root / f"synth-{cfg.key()}"
    path = folder / f"{split}.pt"
    if path.is_file():
        return TripletSet.load(path)
    judge = teacher() if teacher is not None and cfg.teacher_fraction > 0 else None
    data = generate(cfg, split, judge, progress)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    data.save(path)
    return data


def kind_counts(data: TripletSet) -> dict[str, int]:
    """How many triplets of each label kind ``data`` holds."""
    return {
        k: int((data.kind == i).sum()) for i, k in enumerate(KINDS) if bool((data.kind == i).any())
    }
