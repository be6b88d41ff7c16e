"""Evaluation images (never used in training), benign edits and objective 2AFC triplets.

**Split.** The shipped model was trained on synthetic 2AFC patches of ``imagenet-sample``, split 80/10/10
*by source image* with ``split_sources(1000, seed=0, (0.8, 0.1, 0.1))`` (docs/TRAINING.md): 800 train and
100 val sources (val chose the learning rate). Evaluation uses only the 100 **test** sources of that split
plus the 24 **Kodak** images (never used by the project's training): :func:`eval_files`.

**2AFC.** Objective triplets exactly as :mod:`app.training.datasets` draws them (``_draft`` with
``teacher_fraction = 0``): a random square patch of a test source (64..192 px) resized to 64×64 is the
reference; ``p0``/``p1`` are the *same* distortion draw at two severities at least 0.3 apart; the milder
one is closer (``h ∈ {0, 1}``). Every slot that is objective in the training configuration is
bit-identical here (same seeded generator per ``(seed, source, patch)``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps
from torch import Tensor

from app.imaging import decode, resize, to_tensor, to_unit
from app.training import distortions
from app.training.datasets import SynthConfig, TripletSet, generate, source_files, split_sources

SHARED = Path(__file__).resolve().parents[3] / "shared" / "images"
IMAGENET = SHARED / "imagenet-sample"
KODAK = SHARED / "kodak24"
#: The training configuration's split (docs/TRAINING.md): seed and fractions.
TRAIN_SEED = 0
TRAIN_FRACTIONS = (0.8, 0.1, 0.1)

Edit = Callable[[Image.Image], Image.Image]


def jpeg_edit(quality: int) -> Edit:
    """Re-encode as JPEG at ``quality`` (a benign edit)."""

    def edit(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    return edit


def calibration_files(images: Path = IMAGENET) -> list[Path]:
    """Images that calibrate thresholds: of the project's ImageNet sample, the val-split sources (never
    trained on, never evaluated on); of any other folder (e.g. samples of a deployment's own traffic),
    every image."""
    files = source_files(images)
    if images.resolve() != IMAGENET.resolve():
        return files
    return [files[i] for i in split_sources(len(files), TRAIN_SEED, TRAIN_FRACTIONS)["val"]]


def training_files(images: Path = IMAGENET) -> list[Path]:
    """The sources the shipped model's training saw: its train and val splits."""
    files = source_files(images)
    split = split_sources(len(files), TRAIN_SEED, TRAIN_FRACTIONS)
    return [files[i] for i in split["train"] + split["val"]]


def eval_files(images: Path = IMAGENET, kodak: Path | None = KODAK) -> list[Path]:
    """The test-split sources of ``images`` (name order), then every Kodak image if ``kodak`` exists."""
    files = source_files(images)
    test = [files[i] for i in split_sources(len(files), TRAIN_SEED, TRAIN_FRACTIONS)["test"]]
    extra = source_files(kodak) if kodak is not None and kodak.is_dir() else []
    return test + extra


def load_images(files: list[Path], size: int) -> Tensor:
    """Decoded images resized to ``size``×``size`` (the service's path): ``[N, 3, size, size]`` in [0, 1]."""
    return torch.stack([to_unit(to_tensor(resize(decode(p.read_bytes()), size))) for p in files])


def objective_triplets(n: int, images: Path = IMAGENET, patch: int = 64) -> TripletSet:
    """``n`` objective 2AFC triplets from the test sources (``n / 100`` patches per source)."""
    cfg = SynthConfig(
        images_dir=str(images), seed=TRAIN_SEED, sizes=(0, 0, n), fractions=TRAIN_FRACTIONS,
        patch=patch, teacher_fraction=0.0,
    )  # fmt: skip
    return generate(cfg, "test")


# -- benign edits (PIL, on the decoded original; the result is then resized like any upload) ----


def _rescale(factor: float) -> Edit:
    def edit(img: Image.Image) -> Image.Image:
        w, h = img.size
        small = img.resize(
            (max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC
        )
        return small.resize((w, h), Image.Resampling.BICUBIC)

    return edit


def _crop(fraction: float) -> Edit:
    """Keep the centred ``1 − fraction`` of each side (crop 20 % keeps 64 % of the area)."""

    def edit(img: Image.Image) -> Image.Image:
        w, h = img.size
        dx, dy = round(w * fraction / 2), round(h * fraction / 2)
        return img.crop((dx, dy, w - dx, h - dy))

    return edit


def _rotate(degrees: float) -> Edit:
    """Rotate about the centre and crop to the largest axis-aligned rectangle without corners."""

    def edit(img: Image.Image) -> Image.Image:
        w, h = img.size
        r = img.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=False)
        a = math.radians(abs(degrees))
        cw = (w * math.cos(a) - h * math.sin(a)) / math.cos(2 * a) if math.cos(2 * a) > 0 else w
        ch = (h * math.cos(a) - w * math.sin(a)) / math.cos(2 * a) if math.cos(2 * a) > 0 else h
        cw, ch = min(w, max(1.0, cw)), min(h, max(1.0, ch))
        x0, y0 = (w - cw) / 2, (h - ch) / 2
        return r.crop((round(x0), round(y0), round(x0 + cw), round(y0 + ch)))

    return edit


def _translate(fraction: float) -> Edit:
    """Shift right/down by ``fraction`` of the size; the uncovered border repeats the edge (reflect)."""

    def edit(img: Image.Image) -> Image.Image:
        w, h = img.size
        dx, dy = round(w * fraction), round(h * fraction)
        arr = np.asarray(img)
        arr = np.pad(arr, ((dy, 0), (dx, 0), (0, 0)), mode="reflect")[:h, :w]
        return Image.fromarray(np.ascontiguousarray(arr))

    return edit


def _overlay(img: Image.Image) -> Image.Image:
    """A caption bar: a white box over the lower 12 % of the image with black text."""
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, round(h * 0.88), w, h), fill=(255, 255, 255))
    draw.text((round(w * 0.03), round(h * 0.9)), "@uploader  #repost  2026", fill=(0, 0, 0))
    return out


EDITS: dict[str, Edit] = {
    "jpeg-q75": jpeg_edit(75),
    "jpeg-q30": jpeg_edit(30),
    "rescale-0.5": _rescale(0.5),
    "blur-r1": lambda im: im.filter(ImageFilter.GaussianBlur(1.0)),
    "brightness+15pct": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
    "contrast-20pct": lambda im: ImageEnhance.Contrast(im).enhance(0.8),
    "overlay-caption": _overlay,
    "crop-5pct": _crop(0.05),
    "crop-10pct": _crop(0.10),
    "crop-15pct": _crop(0.15),
    "crop-20pct": _crop(0.20),
    "rotate-2deg": _rotate(2.0),
    "rotate-5deg": _rotate(5.0),
    "translate-3pct": _translate(0.03),
    "hflip": ImageOps.mirror,
}
#: The mild edit whose detected copies the evasion attack starts from.
MILD_EDIT = "jpeg-q75"


def edited_pairs(
    files: list[Path], edits: list[str], size: int
) -> tuple[Tensor, Tensor, list[str]]:
    """``(originals [M, 3, s, s], edited [M·E, 3, s, s], edit names)``; edited row ``i·E + e`` is
    edit ``e`` of original ``i``; everything in [0, 1] at ``size``×``size``."""
    orig, edited, names = [], [], []
    for p in files:
        img = decode(p.read_bytes())
        orig.append(to_unit(to_tensor(resize(img, size))))
        for e in edits:
            edited.append(to_unit(to_tensor(resize(EDITS[e](img), size))))
            names.append(e)
    return torch.stack(orig), torch.stack(edited), names


def distortion_pairs(x: Tensor, per_image: int, seed: int = 0) -> tuple[Tensor, list[str]]:
    """``per_image`` random traditional distortions (``app.training.distortions``, severity U(0, 1)) of
    every image of ``x`` ``[M, 3, H, W]``: ``[M·per_image, 3, H, W]`` in [0, 1] and their names."""
    out, names = [], []
    for i in range(len(x)):
        rng = np.random.default_rng([seed, 4242, i])
        for _ in range(per_image):
            name, d = distortions.sample(rng, tuple(x.shape[2:]), 0.3)  # type: ignore[arg-type]
            out.append(d(x[i], float(rng.uniform(0, 1))).clamp(0, 1))
            names.append(name)
    return torch.stack(out), names


#: Window offsets (fractions of the free margin) of the crop views: four corners, then the centre.
_VIEW_OFFSETS = ((0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5))


def crop_views(
    files: list[Path], size: int, per_image: int, side: float = 0.75
) -> tuple[Tensor, Tensor]:
    """``per_image`` (1..5) views of every image for the unrelated-pairs set: the whole image when 1,
    else windows of ``side`` × the image's sides at the corners (then the centre), each resized to
    ``size``; returns ``(views [M·k, 3, s, s] in [0, 1], source index [M·k])``. Views of one source are
    never paired as negatives."""
    if not 1 <= per_image <= len(_VIEW_OFFSETS):
        raise ValueError(f"per_image must be 1..{len(_VIEW_OFFSETS)}, got {per_image}")
    out, groups = [], []
    for s, p in enumerate(files):
        img = decode(p.read_bytes())
        w, h = img.size
        for k in range(per_image):
            if per_image == 1:
                view = img
            else:
                cw, ch = round(w * side), round(h * side)
                ox, oy = _VIEW_OFFSETS[k]
                x0, y0 = round((w - cw) * ox), round((h - ch) * oy)
                view = img.crop((x0, y0, x0 + cw, y0 + ch))
            out.append(to_unit(to_tensor(resize(view, size))))
            groups.append(s)
    return torch.stack(out), torch.tensor(groups)
