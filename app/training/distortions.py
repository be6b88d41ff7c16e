"""A library of "traditional" image distortions with a continuous severity, for synthetic 2AFC data.

Every distortion is drawn once from a random generator (noise realisation, direction, warp field, ...)
and then applied at any severity ``t`` in ``[0, 1]``: ``d = make(rng, (H, W)); y = d(x, t)`` where ``x``
and ``y`` are ``[3, H, W]`` float tensors in ``[0, 1]``. For a fixed draw, a larger ``t`` moves the image
further from ``x`` (same noise scaled up, stronger blur, lower JPEG quality, larger shift, ...), which is
what makes same-distortion pairs objectively labelled.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

Distortion = Callable[[Tensor, float], Tensor]
Factory = Callable[[np.random.Generator, tuple[int, int]], Distortion]


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


# -- noise -----------------------------------------------------------------------------------


def _spectral_noise(rng: np.random.Generator, shape: tuple[int, int, int], alpha: float) -> Tensor:
    """Unit-variance noise ``[C, H, W]`` whose power spectrum falls as ``f^-alpha`` (0 = white)."""
    _, h, w = shape
    white = rng.standard_normal(shape)
    if alpha != 0:
        fy = np.fft.fftfreq(h)[:, None]
        fx = np.fft.rfftfreq(w)[None, :]
        f = np.sqrt(fx**2 + fy**2)
        f[0, 0] = 1.0 / max(h, w)
        white = np.fft.irfft2(np.fft.rfft2(white) / f ** (alpha / 2), s=(h, w))
    white = white - white.mean(axis=(1, 2), keepdims=True)
    white = white / (white.std(axis=(1, 2), keepdims=True) + 1e-12)
    return torch.from_numpy(white).float()


def _noise(alpha: float, grey: bool, lo: float, hi: float) -> Factory:
    def make(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
        n = _spectral_noise(rng, (1 if grey else 3, *size), alpha)
        return lambda x, t: x + _lerp(lo, hi, t) * n

    return make


def impulse(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    """Salt-and-pepper noise; the pixels hit at a lower severity stay hit at a higher one."""
    u = torch.from_numpy(rng.random((1, *size))).float()
    salt = torch.from_numpy(rng.random((1, *size)) < 0.5).float()
    return lambda x, t: torch.where(u < _lerp(0.003, 0.06, t), salt.expand_as(x), x)


# -- filters and compression -----------------------------------------------------------------


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[3, H, W]`` with reflection padding."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x)
    y = F.pad(x[None], (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return y[0]


def gaussian_blur(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    return lambda x, t: _blur(x, _lerp(0.4, 2.2, t))


def sharpen(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    """Unsharp masking with a growing amount."""
    return lambda x, t: x + _lerp(0.3, 2.5, t) * (x - _blur(x, 1.0))


def resample(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    """Down-sample by a growing factor (antialiased) and up-sample back (bilinear)."""

    def apply(x: Tensor, t: float) -> Tensor:
        h, w = x.shape[1:]
        f = _lerp(1.25, 4.0, t)
        small = F.interpolate(
            x[None], size=(max(2, round(h / f)), max(2, round(w / f))), mode="bilinear",
            antialias=True, align_corners=False,
        )  # fmt: skip
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]

    return apply


def jpeg(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    """JPEG compression (Pillow, 4:2:0) at a quality falling geometrically from 70 to 8."""

    def apply(x: Tensor, t: float) -> Tensor:
        arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(
            buf, format="JPEG", quality=round(math.exp(_lerp(math.log(70), math.log(8), t)))
        )
        out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(out.copy()).permute(2, 0, 1)

    return apply


def posterize(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    """Quantise every channel to fewer levels (from 24 down to 4)."""

    def apply(x: Tensor, t: float) -> Tensor:
        levels = round(math.exp(_lerp(math.log(24), math.log(4), t)))
        return torch.round(x.clamp(0, 1) * (levels - 1)) / (levels - 1)

    return apply


# -- photometric -----------------------------------------------------------------------------


def _luma(x: Tensor) -> Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


def brightness(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    s = _sign(rng)
    return lambda x, t: x + s * _lerp(0.03, 0.25, t)


def contrast(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    s = _sign(rng)
    return lambda x, t: x.mean() + (x - x.mean()) * (1 + s * _lerp(0.08, 0.55, t))


def saturation(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    s = _sign(rng)
    return lambda x, t: _luma(x) + (x - _luma(x)) * (1 + s * _lerp(0.15, 0.9, t))


def color_shift(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    """Add a constant colour cast along a random RGB direction."""
    d = torch.from_numpy(rng.standard_normal(3)).float()
    d = (d / d.norm()).view(3, 1, 1)
    return lambda x, t: x + _lerp(0.03, 0.22, t) * d


def gamma(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    s = _sign(rng)
    return lambda x, t: x.clamp(0, 1) ** math.exp(s * _lerp(0.08, 0.7, t))


# -- geometric -------------------------------------------------------------------------------


def _displace(x: Tensor, flow: Tensor) -> Tensor:
    """Resample ``x`` ``[3, H, W]`` at ``p + flow`` (``flow`` ``[H, W, 2]`` in pixels, xy order)."""
    h, w = x.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    px = (xs + flow[..., 0] + 0.5) / w * 2 - 1
    py = (ys + flow[..., 1] + 0.5) / h * 2 - 1
    grid = torch.stack([px, py], dim=-1)[None].to(x)
    out = F.grid_sample(
        x[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    return out[0]


def shift(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    """Translate by 0.5–3 px in a random direction (reflection at the border)."""
    a = rng.uniform(0, 2 * math.pi)
    d = torch.tensor([math.cos(a), math.sin(a)])
    return lambda x, t: _displace(x, (_lerp(0.5, 3.0, t) * d).expand(*size, 2))


def warp(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    """A smooth random displacement field with a peak amplitude of 0.5–2.5 px."""
    coarse = torch.from_numpy(rng.standard_normal((1, 2, 4, 4))).float()
    field = F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)[0]
    field = (field / field.norm(dim=0).max()).permute(1, 2, 0)
    return lambda x, t: _displace(x, _lerp(0.5, 2.5, t) * field)


def rotate(rng: np.random.Generator, size: tuple[int, int]) -> Distortion:
    """Rotate about the centre by 0.5–5 degrees."""
    s = _sign(rng)
    h, w = size
    ys, xs = torch.meshgrid(
        torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij"
    )

    def apply(x: Tensor, t: float) -> Tensor:
        a = math.radians(s * _lerp(0.5, 5.0, t))
        fx = math.cos(a) * xs - math.sin(a) * ys - xs
        fy = math.sin(a) * xs + math.cos(a) * ys - ys
        return _displace(x, torch.stack([fx, fy], dim=-1))

    return apply


#: The base distortions by name.
DISTORTIONS: dict[str, Factory] = {
    "white_noise": _noise(0.0, False, 0.015, 0.14),
    "grey_noise": _noise(0.0, True, 0.015, 0.14),
    "pink_noise": _noise(1.0, False, 0.015, 0.12),
    "brown_noise": _noise(2.0, False, 0.015, 0.12),
    "blue_noise": _noise(-1.0, False, 0.02, 0.18),
    "impulse": impulse,
    "gaussian_blur": gaussian_blur,
    "sharpen": sharpen,
    "resample": resample,
    "jpeg": jpeg,
    "posterize": posterize,
    "brightness": brightness,
    "contrast": contrast,
    "saturation": saturation,
    "color_shift": color_shift,
    "gamma": gamma,
    "shift": shift,
    "warp": warp,
    "rotate": rotate,
}


def sample(
    rng: np.random.Generator, size: tuple[int, int], p_compose: float = 0.3
) -> tuple[str, Distortion]:
    """A random base distortion, or (with probability ``p_compose``) a chain of 2–3 distinct ones.

    Returns ``(name, d)`` where ``d(x, t)`` clamps its output to ``[0, 1]``; a chain applies every
    member at the same severity, in order, so it stays monotone in ``t``.
    """
    names = sorted(DISTORTIONS)
    k = int(rng.integers(2, 4)) if rng.random() < p_compose else 1
    chosen = [names[i] for i in rng.choice(len(names), size=k, replace=False)]
    parts = [DISTORTIONS[n](rng, size) for n in chosen]

    def apply(x: Tensor, t: float) -> Tensor:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"severity must lie in [0, 1], got {t}")
        for d in parts:
            x = d(x, t).clamp(0, 1)
        return x

    return "+".join(chosen), apply
