"""Hostile and unusual image files, built in memory (for the bad-input tests and the soak script).

Each function returns encoded bytes; none is written to disk. Sizes stay small so that tests are fast.
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


def gradient(width: int = 48, height: int = 32) -> Image.Image:
    """A deterministic RGB test image with structure in both directions."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def jpeg(img: Image.Image | None = None, **kw: object) -> bytes:
    return encode(img or gradient(), "JPEG", quality=90, **kw)


def png_of(img: Image.Image | None = None) -> bytes:
    return encode(img or gradient(), "PNG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header declares ``width``×``height`` 8-bit greyscale pixels, with one tiny IDAT.

    Decoding it would need ``width * height`` bytes; refusing it must happen from the header alone.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)  # four rows of zeros: ~50 bytes compressed
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def jpeg_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A real small JPEG with the dimensions in its SOF0 frame header rewritten to ``width``×``height``."""
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_bomb() -> bytes:
    """A GIF with a 65535×65535 logical screen and image descriptor (a 1-pixel LZW payload)."""
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    struct.pack_into("<HH", data, 6, 65535, 65535)  # logical screen
    desc = data.index(b"\x2c")  # image descriptor: ',' left top width height
    struct.pack_into("<HH", data, desc + 5, 65535, 65535)
    return bytes(data)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def corrupted_jpeg_header() -> bytes:
    """A JPEG whose Huffman tables (DHT segments) are overwritten with 0xFF: the scan cannot decode."""
    data = bytearray(jpeg())
    start = 0
    while (dht := data.find(b"\xff\xc4", start)) != -1:
        length = struct.unpack_from(">H", data, dht + 2)[0]
        data[dht + 4 : dht + 2 + length] = b"\xff" * (length - 2)
        start = dht + 2 + length
    return bytes(data)


def corrupted_png_crc() -> bytes:
    """A PNG with one flipped byte inside IDAT: its CRC no longer matches."""
    data = bytearray(png_of())
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    return bytes(data)


def animated_gif() -> tuple[bytes, bytes]:
    """``(two-frame GIF, its first frame as PNG)``: the service must use the first frame."""
    first = gradient().convert("P", palette=Image.Palette.ADAPTIVE)
    second = Image.new("RGB", first.size, (0, 255, 0)).convert("P")
    gif = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    return gif, png_of(first.convert("RGB"))


def cmyk_jpeg() -> tuple[bytes, bytes]:
    """``(CMYK JPEG, the same picture as RGB PNG)``."""
    img = gradient().convert("CMYK")
    data = encode(img, "JPEG", quality=100)
    return data, png_of(Image.open(io.BytesIO(data)).convert("RGB"))


def png16() -> tuple[bytes, bytes]:
    """``(16-bit greyscale PNG, its 8-bit RGB equivalent)``."""
    grey8 = np.asarray(gradient().convert("L"), dtype=np.uint16)
    img16 = Image.fromarray(grey8 * 257)  # uint16 array -> mode I;16
    return encode(img16, "PNG"), png_of(Image.fromarray(grey8.astype(np.uint8)).convert("RGB"))


def transparent_palette() -> tuple[bytes, bytes]:
    """``(palette PNG whose every pixel is the transparent index, a plain white PNG)``."""
    img = Image.new("P", (40, 40), 0)
    img.putpalette([255, 0, 0] + [0, 0, 0] * 255)  # index 0 is red, fully transparent
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    return buf.getvalue(), png_of(Image.new("RGB", (40, 40), (255, 255, 255)))


def exif_rotated() -> tuple[bytes, bytes]:
    """``(JPEG stored sideways with EXIF orientation 6, the upright picture as PNG)``.

    Orientation 6 means "rotate 90° clockwise to display", so the stored pixels are the upright
    picture rotated 90° counter-clockwise.
    """
    upright = gradient(48, 32)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=100, exif=exif.tobytes()), png_of(upright)


def with_trailing_garbage(data: bytes) -> bytes:
    return data + b"\x00GARBAGE" * 64


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">' + (
    b'<rect width="64" height="64" fill="red"/></svg>'
)
HTML = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"
TEXT = b"this is plain text pretending to be a JPEG\n"
