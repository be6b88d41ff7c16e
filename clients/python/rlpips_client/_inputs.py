"""Images as the caller gives them (path, bytes, file-like, PIL image) → multipart file parts."""

from __future__ import annotations

import io
import mimetypes
import os
from collections.abc import Sequence
from typing import IO, Any, Protocol, TypeAlias, cast, runtime_checkable

#: A multipart file part as httpx takes it: ``(filename, content, content type)``.
FilePart: TypeAlias = tuple[str, bytes, str]


@runtime_checkable
class SavesImage(Protocol):
    """A PIL image, duck-typed: anything with ``save(fp, format=...)``."""

    def save(self, fp: Any, format: str | None = ...) -> None: ...


#: What the client accepts as an image.
ImageInput: TypeAlias = (
    "str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | SavesImage"
)


def _part(name: str, data: bytes) -> FilePart:
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return name, data, kind


def to_part(image: ImageInput, default_name: str) -> FilePart:
    """The image's bytes with a file name (a path's own name, else ``default_name``).

    Paths and file-likes are read as they are (the service decodes JPEG, PNG, WebP …); a PIL image is
    encoded as a lossless PNG. Raises ``TypeError`` for anything else, ``OSError`` for an unreadable path.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return _part(default_name, bytes(image))
    if isinstance(image, str | os.PathLike):
        with open(image, "rb") as f:
            return _part(os.path.basename(os.fspath(image)), f.read())
    read = getattr(image, "read", None)
    if callable(read):
        data = read()
        if not isinstance(data, bytes | bytearray):
            raise TypeError("a file-like image must be opened in binary mode ('rb')")
        name = getattr(image, "name", None)
        return _part(os.path.basename(name) if isinstance(name, str) else default_name, bytes(data))
    if isinstance(image, SavesImage):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return _part(f"{os.path.splitext(default_name)[0]}.png", buf.getvalue())
    raise TypeError(
        f"an image must be a path, bytes, a binary file or a PIL image, not {type(image).__name__}"
    )


def as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a sequence of them as a list (a ``str`` path or ``bytes`` is one image)."""
    if not isinstance(images, Sequence) or isinstance(images, str | bytes | bytearray | memoryview):
        return [cast(ImageInput, images)]
    return list(images)


def form_value(value: str | float | bool | Sequence[str]) -> str:
    """An option as multipart text: the service reads non-text fields as JSON scalars (``true``,
    ``0.5``, ``3``); a list of names is sent comma-separated."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return value
    return ",".join(value)
