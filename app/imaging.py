"""Image decoding with limits, the input convention, resizing and PNG / heat-map encoding.

Convention: decode to RGB uint8 (EXIF orientation applied, greyscale/palette converted, alpha composited on
white) → float ``[0, 1]`` → ``2x − 1``. Pixel limits are checked from the header before the full decode.
The metric works on ``[-1, 1]`` ("signed") images, the attacks on ``[0, 1]`` ("unit") pixel units:
:func:`to_unit` and :func:`to_signed` convert between the two.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

#: Formats accepted by default (Pillow format names).
DEFAULT_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})


class ImageError(ValueError):
    """An input that cannot be used as an image; the subclass says why. ``source`` names the input
    (e.g. ``reference``) once the caller knows it (:meth:`at`)."""

    def __init__(self, message: str, source: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.source = source

    def at(self, source: str) -> ImageError:
        """The same error, naming the input it came from."""
        return type(self)(self.message, source)


class InvalidImage(ImageError):
    """Not decodable: empty, not an image, truncated, corrupt."""


class ImageTooLarge(ImageError):
    """Declares more pixels than the limit (refused before decoding)."""


class UnsupportedFormat(ImageError):
    """A real image in a format that is not allowed."""


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 40_000_000
    formats: frozenset[str] = DEFAULT_FORMATS


def open_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Open ``data``, check format and header size against ``limits``; not yet fully decoded."""
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage("the data is not an image in a known format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(
            f"the image header declares too many pixels (over the limit of {limits.max_pixels}); "
            f"refused before decoding: {exc}",
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"cannot read the image header: {exc}") from None
    if img.format not in limits.formats:
        raise UnsupportedFormat(
            f"image format {img.format} is not allowed; allowed: {', '.join(sorted(limits.formats))}",
        )
    w, h = img.size
    if w < 1 or h < 1:
        raise InvalidImage(f"image has no pixels ({w}x{h})")
    if w * h > limits.max_pixels:
        raise ImageTooLarge(
            f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}",
        )
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Fully decode ``img`` to RGB: first frame, EXIF orientation applied, alpha composited on white."""
    try:
        img.seek(0)
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            scale = 65535.0 if arr.max() > 255 else 255.0
            img = Image.fromarray((arr / scale * 255.0).round().clip(0, 255).astype(np.uint8))
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        rgb = img.convert("RGB")
        rgb.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"cannot decode the image: {exc}") from None
    return rgb


def decode(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Bytes → RGB PIL image (see module docstring for the convention)."""
    return to_rgb(open_image(data, limits))


def resize(img: Image.Image, size: int | None) -> Image.Image:
    """Antialiased (bicubic) resize to ``size``×``size``; ``None`` keeps the native size."""
    if size is None or img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC)


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image → ``[3, H, W]`` float32 in ``[-1, 1]``."""
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return t / 127.5 - 1.0


def load_tensor(
    data: bytes, size: int | None, limits: DecodeLimits = DecodeLimits(), draft: bool = False
) -> Tensor:
    """Bytes → ``[3, size, size]`` (or native ``[3, H, W]``) float32 in ``[-1, 1]``.

    ``draft`` (opt-in): JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) still at least ``size``
    on each side, then resize as usual — about 2× cheaper at 64², but distances move by up to 0.027
    (docs/BENCHMARKS.md), so it is off by default.
    """
    img = open_image(data, limits)
    if draft and size is not None and img.format == "JPEG":
        img.draft(None, (size, size))
    return to_tensor(resize(to_rgb(img), size))


def to_unit(x: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` (the metric's convention) → ``[0, 1]`` pixel units (the attacks')."""
    return (x + 1) / 2


def to_signed(x: Tensor) -> Tensor:
    """Images in ``[0, 1]`` pixel units → ``[-1, 1]`` (the metric's convention)."""
    return 2 * x - 1


def tensor_to_png(x: Tensor) -> bytes:
    """``[3, H, W]`` in ``[-1, 1]`` → lossless 8-bit PNG bytes (rounded to the nearest level)."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def heatmap_png(m: Tensor) -> bytes:
    """Spatial distance map ``[1, H, W]`` or ``[H, W]`` (≥ 0) → PNG heat map (magma, max-scaled)."""
    from matplotlib import colormaps

    arr = m.detach().float().cpu().reshape(m.shape[-2], m.shape[-1]).numpy()
    peak = float(arr.max()) or 1.0
    rgba = colormaps["magma"](arr / peak)
    buf = io.BytesIO()
    Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
