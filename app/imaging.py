"""Image decoding with limits, the input convention, resizing and PNG / heat-map encoding.

Convention: decode to RGB uint8 (EXIF orientation applied, greyscale/palette converted, 16-bit scaled
by its bit depth, alpha composited on white) → float ``[0, 1]`` → ``2x − 1``. The metric works on
``[-1, 1]`` ("signed") images, the attacks on ``[0, 1]`` ("unit") pixel units: :func:`to_unit` and
:func:`to_signed` convert between the two.

Every byte is hostile: :func:`open_image` reads only the header and decides the decode *cost* before any
expensive work — the declared pixels (refused over ``max_pixels``), a charge per row (very tall images
cost row bookkeeping), and for JPEG the structure (scan count, arithmetic coding, whether the data can
even hold the declared size). Large images are reduced by an integer box factor before any mode
conversion and resized from there, so memory stays proportional to the pixels decoded.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

#: Formats accepted by default (Pillow format names; MPO is a JPEG with extra frames, as phones write).
DEFAULT_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
#: Bicubic resizing is preceded by an integer box reduction while the image stays at least this many
#: times the target size on that axis (Pillow's ``reducing_gap``: indistinguishable from a direct
#: resize, and memory and time proportional to the pixels instead of to the axis ratio).
REDUCING_GAP = 3.0
#: Decode cost charged per image row and per column (two extra rows: the decoders' line buffers), in
#: pixels: very tall or very wide images cost bookkeeping and buffers beyond their pixel count.
ROW_COST = 16
#: Formats whose decoding needs several full-size buffers (measured peak memory per pixel over PNG's).
FORMAT_COST = {"WEBP": 3}
#: Decode cost of each JPEG scan after the first three, as a fraction of one full decode
#: (measured ≈ 0.06 at 6000x6000 on the benchmark CPU; charged at 0.1).
SCAN_COST = 0.1


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
    """Not decodable: empty, not an image, truncated, corrupt, a header the data cannot back."""


class ImageTooLarge(ImageError):
    """Would cost more to decode than allowed (pixels, JPEG scans): refused before decoding."""


class UnsupportedFormat(ImageError):
    """A real image in a format (or a JPEG coding) that is not allowed."""


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 40_000_000
    formats: frozenset[str] = DEFAULT_FORMATS
    max_scans: int = 64


@dataclass(frozen=True)
class Header:
    """What an image's header promises: format, size, and the decode ``cost`` in pixel units (about
    the work and memory of decoding that many RGB pixels)."""

    format: str
    width: int
    height: int
    cost: int


# -- the header and the JPEG structure ------------------------------------------------------------

#: A marker that ends entropy-coded data: 0xFF followed by anything but a stuffed 0x00, a restart
#: marker (RST0-7) or another fill byte.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


@dataclass(frozen=True)
class JpegLayout:
    """The structure of a JPEG's first image: ``blocks`` (8×8 blocks over all components), ``scans``,
    bytes of entropy-coded data, progressive or sequential, arithmetic or Huffman coding."""

    blocks: int
    scans: int
    entropy_bytes: int
    progressive: bool
    arithmetic: bool


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _frame_blocks(body: bytes) -> int:
    """8×8 blocks of all components of a SOF segment body (precision, height, width, components)."""
    if len(body) < 6:
        raise InvalidImage("the JPEG frame header is truncated")
    height, width, n = int.from_bytes(body[1:3]), int.from_bytes(body[3:5]), body[5]
    if n < 1 or len(body) < 6 + 3 * n:
        raise InvalidImage("the JPEG frame header is malformed")
    sampling = [(body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(n)]
    if min(min(s) for s in sampling) < 1:
        raise InvalidImage("the JPEG frame header has a zero sampling factor")
    hmax, vmax = max(s[0] for s in sampling), max(s[1] for s in sampling)
    return sum(
        _ceil_div(_ceil_div(width * h, hmax), 8) * _ceil_div(_ceil_div(height * v, vmax), 8)
        for h, v in sampling
    )


def jpeg_layout(data: bytes) -> JpegLayout:
    """Walk the markers of the first image of ``data`` (to its EOI); raise :class:`InvalidImage` when
    the structure is broken. Entropy-coded data is skipped with a regular expression (C speed)."""
    n, pos = len(data), 2
    blocks, scans, entropy, sof = 0, 0, 0, 0
    while pos < n:
        if data[pos] != 0xFF:
            raise InvalidImage(f"the JPEG structure is broken: no marker at byte {pos}")
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            continue
        length = int.from_bytes(data[pos : pos + 2])
        end = pos + length
        if length < 2 or end > n:
            raise InvalidImage("the JPEG data is truncated inside a segment")
        if marker in _SOF and not sof:
            sof, blocks = marker, _frame_blocks(data[pos + 2 : end])
        pos = end
        if marker == 0xDA:  # SOS: entropy-coded data up to the next real marker
            scans += 1
            found = _MARKER.search(data, pos)
            nxt = found.start() if found else n
            entropy += nxt - pos
            pos = nxt
    if not sof:
        raise InvalidImage("the JPEG has no frame header")
    return JpegLayout(blocks, scans, entropy, sof in _PROGRESSIVE, sof >= 0xC9)


def _check_jpeg(data: bytes, w: int, h: int, limits: DecodeLimits) -> int:
    """Refuse JPEGs whose structure is hostile; return the scan count."""
    layout = jpeg_layout(data)
    if layout.arithmetic:
        raise UnsupportedFormat("arithmetic-coded JPEG is not supported (browsers do not either)")
    if layout.scans > limits.max_scans:
        raise ImageTooLarge(
            f"the JPEG has {layout.scans} scans; at most {limits.max_scans} are accepted "
            "(each scan is another pass over the whole image)"
        )
    # Huffman coding spends at least 1 bit per block in the DC scan(s) of a progressive JPEG and 2
    # (DC and end-of-block) in a sequential one: less data than that cannot hold the declared size.
    need = layout.blocks // (8 if layout.progressive else 4)
    if layout.entropy_bytes < need:
        raise InvalidImage(
            f"the JPEG header declares {w}x{h} but holds only {layout.entropy_bytes} bytes of "
            f"image data, less than the {need} that size needs (truncated or lying header)"
        )
    return layout.scans


def decode_cost(width: int, height: int, fmt: str = "PNG", scans: int = 1) -> int:
    """The decode cost of a ``width``×``height`` image in pixel units: rows, line buffers, the format's
    buffers and JPEG scans charged."""
    scan_factor = 1 + SCAN_COST * max(0, scans - 3)
    return int((width + ROW_COST) * (height + 2) * FORMAT_COST.get(fmt, 1) * scan_factor)


def open_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> tuple[Image.Image, Header]:
    """Open ``data`` and check its header against ``limits``: format, pixels, and for JPEG its
    structure; nothing is decoded yet. Returns the lazily opened image and its :class:`Header`."""
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
    scans = _check_jpeg(data, w, h, limits) if img.format in ("JPEG", "MPO") else 1
    return img, Header(str(img.format), w, h, decode_cost(w, h, str(img.format), scans))


def inspect(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Header:
    """The checked :class:`Header` of ``data`` (see :func:`open_image`), without decoding."""
    img, header = open_image(data, limits)
    img.close()
    return header


# -- decoding -------------------------------------------------------------------------------------


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (``I;16*``, or ``I`` as Pillow opens 16-bit PNG/TIFF) → ``L``, scaled by
    the bit depth (``round(v · 255 / 65535)``), in row chunks so the temporary stays small."""
    src = np.asarray(img)
    out = np.empty(src.shape, dtype=np.uint8)
    rows = max(1, (1 << 20) // max(1, src.shape[1]))
    for r in range(0, src.shape[0], rows):
        block = src[r : r + rows].astype(np.int64).clip(0, 65535)
        out[r : r + rows] = (block * 255 + 32767) // 65535
    return Image.fromarray(out, mode="L")


def _reducible(img: Image.Image) -> Image.Image:
    """``img`` in a mode that box reduction and compositing understand: ``L``, ``LA``, ``RGB`` or
    ``RGBA`` (palettes expanded, transparency kept, 16-bit scaled, other colour spaces to RGB)."""
    if img.mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        return _sixteen_to_eight(img)
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
    if img.mode in ("La", "RGBa"):
        return img.convert("RGBA" if img.mode == "RGBa" else "LA")
    if img.mode in ("1", "F"):
        return img.convert("L")
    return img.convert("RGB")


def _reduce_first(img: Image.Image, size: int) -> Image.Image:
    """Integer box reduction while the image stays ``REDUCING_GAP`` times ``size`` on each axis
    (premultiplied for alpha, by Pillow); a no-op for images less than 6× the target on both axes."""
    fx, fy = (max(1, int(s // (size * REDUCING_GAP))) for s in img.size)
    return img if (fx, fy) == (1, 1) else img.reduce((fx, fy))


def _on_white(img: Image.Image) -> Image.Image:
    """``L``/``LA``/``RGB``/``RGBA`` → RGB, alpha composited on white."""
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def to_rgb(img: Image.Image, size: int | None = None) -> Image.Image:
    """Fully decode ``img`` to RGB: first frame, EXIF orientation applied, alpha composited on white.
    With ``size``, a large image is box-reduced towards ``size`` first (see :data:`REDUCING_GAP`)."""
    try:
        img.seek(0)
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
        img = _reducible(img)
        if size is not None:
            img = _reduce_first(img, size)
        rgb = _on_white(img)
        rgb.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"cannot decode the image: {exc}") from None
    return rgb


def decode(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Bytes → RGB PIL image at its native size (see module docstring for the convention)."""
    return to_rgb(open_image(data, limits)[0])


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
    img, header = open_image(data, limits)
    if draft and size is not None and header.format in ("JPEG", "MPO"):
        img.draft(None, (size, size))
    return to_tensor(resize(to_rgb(img, size), size))


def tensor_to_png(x: Tensor, compress_level: int = 6) -> bytes:
    """``[3, H, W]`` in ``[-1, 1]`` → lossless 8-bit PNG bytes (rounded to the nearest level);
    ``compress_level`` 0-9 (zlib: 1 encodes a 256² photo about 3× faster than 6, 9 % larger)."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.permute(1, 2, 0).numpy()).save(
        buf, format="PNG", compress_level=compress_level
    )
    return buf.getvalue()


def heatmap_png(m: Tensor, peak: float | None = None) -> bytes:
    """Spatial distance map ``[1, H, W]`` or ``[H, W]`` (≥ 0) → PNG heat map (magma): 0 is the bottom
    of the colour scale and ``peak`` (default: the map's own maximum) the top; values above it clip."""
    from matplotlib import colormaps

    arr = m.detach().float().cpu().reshape(m.shape[-2], m.shape[-1]).numpy()
    top = (float(arr.max()) if peak is None else peak) or 1.0
    rgba = colormaps["magma"](np.clip(arr / top, 0.0, 1.0))
    buf = io.BytesIO()
    Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def to_unit(x: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` (the metric's convention) → ``[0, 1]`` pixel units (the attacks')."""
    return (x + 1) / 2


def to_signed(x: Tensor) -> Tensor:
    """Images in ``[0, 1]`` pixel units → ``[-1, 1]`` (the metric's convention)."""
    return 2 * x - 1
