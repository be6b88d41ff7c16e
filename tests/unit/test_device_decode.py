"""The device decode path on the CPU (torchvision's libjpeg-turbo; nvJPEG is measured by make gpu-check):
what it accepts, its shape and range, and its parity with the Pillow path (pixels and distances)."""

from __future__ import annotations

import io

import torch
from PIL import Image

from app.device_decode import accepts, decode_resize
from app.imaging import load_tensor
from app.metric.store import ModelStore
from tests.support.apiutil import jpegs

SIZE = 64


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", **kw)
    return out.getvalue()


def test_accepts_plain_jpegs_only() -> None:
    [real] = jpegs(1, start=5)
    assert accepts(real)
    rgb = Image.open(io.BytesIO(real)).convert("RGB")
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotate 90°: the Pillow path turns it, nvJPEG would not
    assert not accepts(_jpeg(rgb, exif=exif.tobytes()))
    assert not accepts(_jpeg(rgb.convert("CMYK")))
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    assert not accepts(png.getvalue())
    assert not accepts(b"\xff\xd8\xff not a jpeg")
    assert accepts(_jpeg(rgb.convert("L")))


def test_matches_the_pillow_path(store: ModelStore) -> None:
    datas = jpegs(12, start=100)
    got = decode_resize(datas, SIZE, torch.device("cpu"))
    want = torch.stack([load_tensor(d, SIZE) for d in datas])
    assert got.shape == want.shape == (12, 3, SIZE, SIZE) and got.dtype == torch.float32
    levels = (got + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # whole 8-bit levels, as Pillow gives
    assert levels.min() >= 0 and levels.max() <= 255
    assert float((got - want).abs().mean()) * 127.5 < 0.5  # mostly the same 8-bit levels
    metrics, _ = store.load_shared(["lpips-alex"], "cpu")
    with torch.no_grad():
        d_got = metrics["lpips-alex"].compare(got[0::2], got[1::2]).total
        d_want = metrics["lpips-alex"].compare(want[0::2], want[1::2]).total
    assert float((d_got - d_want).abs().max()) < 3e-3  # 2.0e-3 at worst over 49 pairs at 256²
    assert float((d_got - d_want).abs().max()) > 0 or torch.equal(got, want)
