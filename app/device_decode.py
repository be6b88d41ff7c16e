"""Batched JPEG decoding and resizing on a torch device: nvJPEG (through torchvision) on CUDA, libjpeg-turbo
on the CPU. The GPU decode path of issue 15, opt-in (``RLPIPS_DECODE_DEVICE=device``): /distance then
keeps accepted JPEGs undecoded (:attr:`Image.jpeg`) and :func:`decode_pending` decodes a whole
micro-batch's in one call on the device thread.

For the JPEGs it accepts (:func:`accepts`) it mirrors :func:`app.imaging.load_tensor`: the integer box
reduction first (:data:`app.imaging.REDUCING_GAP`), then an antialiased bicubic resize (the same kernel
as Pillow's, a = -0.5) and rounding to 8-bit levels, as Pillow's 8-bit images are. What remains is the
decoders' own difference (IDCT, chroma upsampling) and Pillow's fixed-point arithmetic: on the CPU,
LPIPS-alex distances differ from the Pillow path by at most 2.0e-3 (mean 3.4e-4) and the robust
default's by 1.4e-4 (mean 3.8e-5) over 49 ImageNet pairs at 256² (``python -m benchmarks.device_decode``,
docs/benchmarks/device-decode-cpu.json) — above issue 15's 1e-3 for LPIPS-alex, so the path stays
opt-in; nvJPEG on a GPU is measured by ``make gpu-check``. Everything else (other formats, EXIF rotation, CMYK, arithmetic coding)
stays on the Pillow path. torchvision 0.29 deprecates its image decoders in favour of TorchCodec; the
device's preinstalled torchvision is what the GPU check can use, so this stays on torchvision for now.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from app.imaging import REDUCING_GAP, ImageError, jpeg_layout
from app.metric.queries import Image, Query

_EXIF_ORIENTATION = 0x0112


def accepts(data: bytes) -> bool:
    """Whether :func:`decode_resize` gives what the Pillow path gives for ``data``: a Huffman-coded
    JPEG in RGB or grey, without an EXIF rotation. Reads the header only."""
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return False
        return not jpeg_layout(data).arithmetic
    except (OSError, ValueError, SyntaxError):
        return False


def decode_resize(datas: Sequence[bytes], size: int, device: torch.device) -> Tensor:
    """JPEG bytes (each accepted by :func:`accepts`) → ``[N, 3, size, size]`` float32 in ``[-1, 1]`` on
    ``device``, decoded in one batched call."""
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    return torch.stack([_resize(t, size) for t in decoded]) / 127.5 - 1.0


def _resize(image: Tensor, size: int) -> Tensor:
    """``[3, H, W]`` uint8 → ``[3, size, size]`` float32 levels in ``[0, 255]`` (whole numbers)."""
    x = image[None].float()
    h, w = (int(s) for s in x.shape[-2:])
    fx, fy = (max(1, int(s // (size * REDUCING_GAP))) for s in (w, h))
    if (fx, fy) != (1, 1):  # Pillow's reduce(): box means, partial blocks at the edges
        x = F.avg_pool2d(x, (fy, fx), ceil_mode=True, count_include_pad=False).round()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x[0].clamp(0, 255).round()


def decode_pending(
    queries: Sequence[Query], size: int, device: torch.device, fallback: Callable[[bytes], Tensor]
) -> tuple[list[Query], dict[int, ImageError]]:
    """``queries`` with every pending image (``jpeg`` set) decoded on ``device`` — one batched call
    for all of them, each distinct image once — and the errors of the queries that cannot run.

    If the batched call fails, each image is decoded alone; one the device decoder refuses goes through
    ``fallback`` (the Pillow path: bytes → ``[3, size, size]`` in ``[-1, 1]``), and a query with an image
    that neither can decode is left out, its :class:`ImageError` naming the input, keyed by its index.
    """
    pending = {im.key: im for q in queries for im in (q.reference, *q.candidates) if im.jpeg}
    if not pending:
        return list(queries), {}
    done, refused = _decode_all(list(pending.values()), size, device, fallback)
    out: list[Query] = []
    errors: dict[int, ImageError] = {}
    for i, q in enumerate(queries):
        images = [q.reference, *q.candidates]
        failed = [refused[im.key] for im in images if im.key in refused]
        if failed:
            errors[i] = failed[0]
            continue
        ready = [replace(im, tensor=done[im.key], jpeg=None) if im.jpeg else im for im in images]
        out.append(replace(q, reference=ready[0], candidates=tuple(ready[1:])))
    return out, errors


def _decode_all(
    images: list[Image], size: int, device: torch.device, fallback: Callable[[bytes], Tensor]
) -> tuple[dict[str, Tensor], dict[str, ImageError]]:
    """``({key: [3, size, size] on device}, {key: error})`` for pending ``images``."""
    datas = [im.jpeg or b"" for im in images]
    try:
        batch = decode_resize(datas, size, device)
        return {im.key: t for im, t in zip(images, batch, strict=True)}, {}
    except RuntimeError:
        pass
    done: dict[str, Tensor] = {}
    refused: dict[str, ImageError] = {}
    for im, data in zip(images, datas, strict=True):
        try:
            done[im.key] = decode_resize([data], size, device)[0]
        except RuntimeError:
            try:
                done[im.key] = fallback(data).to(device)
            except ImageError as exc:
                refused[im.key] = exc.at(im.source)
    return done, refused
