"""The device decode path on the CPU (torchvision's libjpeg-turbo; nvJPEG is measured by make gpu-check):
what it accepts, its shape and range, and its parity with the Pillow path (pixels and distances)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from app.device_decode import accepts, decode_pending, decode_resize
from app.imaging import InvalidImage, load_tensor
from app.metric.queries import Image as Img
from app.metric.queries import Query, content_key
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


def _pending(data: bytes, source: str) -> Img:
    return Img(torch.empty(0), content_key(data), data, source)


def _broken_scan(data: bytes) -> bytes:
    """``data`` whose scan names Huffman tables 3/3, which it never defines: the header is sound (so
    accepted), decoding fails (libjpeg: "Huffman table 0x03 was not defined")."""
    sos = data.index(b"\xff\xda")
    return data[: sos + 6] + b"\x33" + data[sos + 7 :]


def test_pending_images_decode_in_one_batch_and_a_bad_one_fails_only_its_query() -> None:
    a, b, c = jpegs(3, start=200)
    bad = _broken_scan(_jpeg(Image.open(io.BytesIO(c)).convert("RGB")))  # baseline, no thumbnail
    assert accepts(bad)
    plain = Img(load_tensor(a, SIZE), content_key(a))  # decoded on the CPU already
    queries = [
        Query("m", _pending(a, "reference"), (_pending(b, "candidate[0]"),)),
        Query("m", plain, (_pending(bad, "candidate[1]"), _pending(b, "candidate[0]"))),
        Query("m", _pending(b, "reference"), (plain,)),
    ]
    calls: list[bytes] = []

    def fallback(data: bytes) -> torch.Tensor:
        calls.append(data)
        return load_tensor(data, SIZE)  # Pillow refuses the broken scan too

    ready, errors = decode_pending(queries, SIZE, torch.device("cpu"), fallback)
    assert list(errors) == [1] and isinstance(errors[1], InvalidImage)
    assert errors[1].source == "candidate[1]"
    assert calls == [bad]  # only the image the device decoder refused went to the fallback
    assert [q.reference.key for q in ready] == [queries[0].reference.key, queries[2].reference.key]
    want = decode_resize([a, b], SIZE, torch.device("cpu"))
    torch.testing.assert_close(ready[0].reference.tensor, want[0])
    torch.testing.assert_close(ready[0].candidates[0].tensor, want[1])
    torch.testing.assert_close(ready[1].reference.tensor, want[1])
    assert ready[1].candidates[0] is plain
    assert all(i.jpeg is None for q in ready for i in (q.reference, *q.candidates))


def test_nothing_pending_is_left_alone() -> None:
    (a,) = jpegs(1, start=7)
    img = Img(load_tensor(a, SIZE), content_key(a))
    queries = [Query("m", img, (img,))]

    def fallback(data: bytes) -> torch.Tensor:
        raise AssertionError("not called")

    assert decode_pending(queries, SIZE, torch.device("cpu"), fallback) == (queries, {})
    with pytest.raises(AssertionError):
        fallback(a)
