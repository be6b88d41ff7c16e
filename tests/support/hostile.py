"""Generators of hostile uploads (nothing stored): decode bombs of every accepted format, aspect-ratio and
bit-depth edge cases, truncated and lying headers. Each returns the bytes of one image (or body).

Shared by the hostile-input tests (``tests/e2e/test_hostile.py``) and the load-and-hostile benchmark
(``benchmarks/hostile.py``).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, bit_depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG written by hand (so sizes and depths Pillow will not write are possible): ``rows`` is the
    filtered scanline data (a filter byte per row), compressed at level 9."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows, 9))
        + _png_chunk(b"IEND", b"")
    )


def png_zeros(width: int, height: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A valid all-zero PNG (compresses ~1000:1): the classic decompression bomb."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row = 1 + width * channels * bit_depth // 8
    compressor = zlib.compressobj(9)
    zero_row = b"\x00" * row
    parts = [compressor.compress(zero_row) for _ in range(height)]
    data = b"".join(parts) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def png16_grey(value: int, size: int = 64) -> bytes:
    """A 16-bit greyscale PNG whose every sample is ``value`` (0..65535)."""
    arr = np.full((size, size), value, dtype=np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def png16_rgb(value: int, size: int = 64) -> bytes:
    """A 16-bit RGB PNG (written by hand: Pillow cannot) whose every sample is ``value``."""
    row = b"\x00" + struct.pack(">H", value) * 3 * size
    return png_raw(size, size, 16, 2, row * size)


def jpeg_flat(width: int, height: int, progressive: bool = False, quality: int = 90) -> bytes:
    return encode(
        Image.new("RGB", (width, height), (120, 130, 140)),
        "JPEG",
        quality=quality,
        progressive=progressive,
    )


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """``(marker, start, end)`` of every segment of a JPEG (SOS segments include their data)."""
    out, i, n = [], 2, len(data)
    while i < n:
        while data[i] == 0xFF:
            i += 1
        marker, start = data[i], i - 1
        i += 1
        if marker == 0xD9:
            out.append((marker, start, i))
            break
        length = struct.unpack(">H", data[i : i + 2])[0]
        end = i + length
        if marker == 0xDA:
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] in (0x00, *range(0xD0, 0xD8)):
                    end += 2
                    continue
                break
        out.append((marker, start, end))
        i = end
    return out


def jpeg_scan_bomb(width: int = 6000, height: int = 6000, repeats: int = 1000) -> bytes:
    """A progressive JPEG whose last scan is repeated: each copy is a few bytes and another full pass
    over the image for the decoder (about 0.02 s each at 6000x6000)."""
    data = jpeg_flat(width, height, progressive=True)
    segments = _jpeg_segments(data)
    last = [s for s in segments if s[0] == 0xDA][-1]
    eoi = segments[-1]
    return data[: eoi[1]] + data[last[1] : last[2]] * repeats + data[eoi[1] :]


def jpeg_lying_header(width: int = 6000, height: int = 6000) -> bytes:
    """A 48x32 JPEG whose frame header claims ``width``x``height`` (libjpeg would fill the rest)."""
    data = bytearray(jpeg_flat(48, 32))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def jpeg_truncated() -> bytes:
    """A real photo-like JPEG cut in the middle of its data."""
    data = jpeg_gradient(640, 480)
    return data[: len(data) // 2]


def jpeg_gradient(width: int, height: int) -> bytes:
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1).astype(np.uint8)
    return encode(Image.fromarray(rgb), "JPEG", quality=85)


def mpo(width: int = 320, height: int = 240) -> bytes:
    """A phone-style JPEG with an MPF (multi-picture) segment and a second image: Pillow says MPO."""
    first = Image.fromarray(np.full((height, width, 3), 90, np.uint8))
    second = Image.fromarray(np.full((height // 2, width // 2, 3), 200, np.uint8))
    return encode(first, "MPO", save_all=True, append_images=[second])


def gif_bomb(width: int = 65535, height: int = 65535) -> bytes:
    return encode(Image.new("P", (1, 1)), "GIF").replace(
        struct.pack("<HH", 1, 1), struct.pack("<HH", width, height)
    )


def webp_big(width: int = 16383, height: int = 2441) -> bytes:
    """A flat lossless WebP of about 40 Mpx in a few hundred bytes."""
    return encode(Image.new("RGB", (width, height), (10, 20, 30)), "WEBP", lossless=True)


def tiff_deflate(width: int, height: int) -> bytes:
    """A flat deflate-compressed TIFF."""
    return encode(Image.new("RGB", (width, height)), "TIFF", compression="tiff_adobe_deflate")


def bmp_rle(width: int, height: int) -> bytes:
    """An 8-bit RLE BMP of ``width``x``height`` (at most 255 pixels per run) all in colour 0."""
    runs = bytearray()
    for _ in range(height):
        left = width
        while left:
            n = min(255, left)
            runs += bytes([n, 0])
            left -= n
        runs += b"\x00\x00"  # end of line
    runs += b"\x00\x01"  # end of bitmap
    palette = b"\x00\x00\x00\x00" * 256
    header_size = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(runs), 2835, 2835, 256, 0)
    head = b"BM" + struct.pack("<IHHI", header_size + len(runs), 0, 0, header_size)
    return head + info + palette + bytes(runs)
