"""Decoding follows the input convention: RGB, EXIF orientation, alpha on white, limits from the header."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.imaging import (
    DecodeLimits,
    ImageError,
    ImageTooLarge,
    InvalidImage,
    UnsupportedFormat,
    decode,
    load_tensor,
    tensor_to_png,
)


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode(encode(img)).getpixel((0, 0)) == (255, 255, 255)
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert decode(encode(img)).getpixel((0, 0)) == (127, 127, 127)


def test_greyscale_palette_and_16bit_become_rgb() -> None:
    assert decode(encode(Image.new("L", (3, 3), 200))).getpixel((1, 1)) == (200, 200, 200)
    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([10, 20, 30] * 256)
    assert decode(encode(pal)).getpixel((0, 0)) == (10, 20, 30)
    deep = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert decode(encode(deep)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = decode(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_tensor_range_and_shape() -> None:
    img = Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8))
    t = load_tensor(encode(img), None)
    assert t.shape == (3, 1, 1)
    torch.testing.assert_close(t.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    assert load_tensor(encode(img), 32).shape == (3, 32, 32)


def test_png_round_trip_is_lossless() -> None:
    levels = torch.randint(0, 256, (3, 8, 8)).float() / 127.5 - 1
    back = load_tensor(tensor_to_png(levels), None)
    torch.testing.assert_close(back, levels, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", InvalidImage),
        (b"<html></html>", InvalidImage),
        (encode(Image.new("RGB", (10, 10)), "JPEG")[:40], InvalidImage),
    ],
)
def test_undecodable_inputs(data: bytes, kind: type[ImageError]) -> None:
    with pytest.raises(ImageError) as info:
        decode(data)
    assert type(info.value) is kind


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = encode(Image.new("RGB", (300, 300)))
    with pytest.raises(ImageError) as info:
        decode(data, DecodeLimits(max_pixels=300 * 299))
    assert type(info.value) is ImageTooLarge and "90000" in info.value.message


def test_disallowed_format() -> None:
    with pytest.raises(ImageError) as info:
        decode(encode(Image.new("RGB", (4, 4)), "PNG"), DecodeLimits(formats=frozenset({"JPEG"})))
    assert type(info.value) is UnsupportedFormat


def _smooth_picture(w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def test_jpeg_draft_is_opt_in_and_close() -> None:
    """``draft=True`` decodes a large JPEG at a reduced DCT scale (so the pixels differ a little from the
    full decode) and leaves non-JPEG input untouched; the default is the full decode."""
    jpeg = encode(_smooth_picture(640, 480), "JPEG", quality=95)
    full, drafted = load_tensor(jpeg, 64), load_tensor(jpeg, 64, draft=True)
    assert drafted.shape == full.shape == (3, 64, 64)
    diff = (full - drafted).abs()
    assert 0 < float(diff.max()) < 0.1
    assert torch.equal(load_tensor(jpeg, 64, draft=False), full)
    png = encode(_smooth_picture(640, 480))
    assert torch.equal(load_tensor(png, 64, draft=True), load_tensor(png, 64))
    assert torch.equal(load_tensor(jpeg, None, draft=True), load_tensor(jpeg, None))
