"""Batched JPEG decoding and resizing on a torch device: nvJPEG (through torchvision) on CUDA, libjpeg-turbo
on the CPU. The GPU decode path of issue 15, measured but not yet used by the service.

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
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from app.imaging import REDUCING_GAP, jpeg_layout

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
