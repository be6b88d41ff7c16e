"""The input stage: request bodies (multipart or JSON) → image bytes + options → decoded images.

Every problem becomes an :class:`~app.api.errors.ApiError` naming the field (``reference``,
``candidate[i]`` in multipart, ``candidates[i]`` in JSON, or the option).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import ApiError
from app.api.schemas import DistanceJSON, DistanceOptions
from app.engine import Image
from app.imaging import ImageError
from app.service import Runtime

OPTION_FIELDS = ("model", "threshold", "spatial", "per_layer")
MULTIPART_FIELDS = ("reference", "candidate", *OPTION_FIELDS)


@dataclass(frozen=True)
class DistanceInput:
    """The raw inputs of one ``POST /distance``; ``field`` is how candidates are named in errors."""

    reference: bytes
    candidates: list[bytes]
    options: DistanceOptions
    field: str


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_distance(request: Request, max_candidates: int) -> DistanceInput:
    """Parse the body by its content type; 415 for anything but multipart or JSON."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        got = await _read_multipart(request, max_candidates)
    elif kind == "application/json" or kind.endswith("+json"):
        got = await _read_json(request, max_candidates)
    else:
        raise ApiError(
            "unsupported_media_type",
            f"content type {kind or '(none)'!r} is not supported; "
            "send multipart/form-data or application/json",
        )
    return got


def _check_count(n: int, max_candidates: int, field: str) -> None:
    if n < 1:
        raise ApiError("validation_error", f"at least one {field} is required", field)
    if n > max_candidates:
        raise ApiError(
            "validation_error",
            f"{n} candidates given; at most {max_candidates} per request",
            field,
        )


def _options(raw: dict[str, object]) -> DistanceOptions:
    try:
        return DistanceOptions.model_validate(raw)
    except ValidationError as exc:
        raise ApiError.from_validation(exc) from None


async def read_form(request: Request, max_files: int) -> FormData:
    """The multipart form (400 ``invalid_multipart`` when it cannot be parsed); close it after use."""
    try:
        return await request.form(max_files=max_files, max_fields=32)
    except StarletteHTTPException as exc:
        raise ApiError(
            "invalid_multipart", f"cannot parse the multipart body: {exc.detail}"
        ) from None


async def _read_multipart(request: Request, max_candidates: int) -> DistanceInput:
    form = await read_form(request, max_candidates + 8)
    try:
        return await _from_form(form, max_candidates)
    finally:
        await form.close()


async def _from_form(form: FormData, max_candidates: int) -> DistanceInput:
    unknown = sorted(set(form.keys()) - set(MULTIPART_FIELDS))
    if unknown:
        raise ApiError(
            "validation_error",
            f"unknown field {unknown[0]!r}; expected {', '.join(MULTIPART_FIELDS)}",
            unknown[0],
        )
    refs = form.getlist("reference")
    if len(refs) != 1 or not isinstance(refs[0], UploadFile):
        raise ApiError(
            "validation_error", "exactly one file field 'reference' is required", "reference"
        )
    cands = form.getlist("candidate")
    _check_count(len(cands), max_candidates, "candidate")
    for i, c in enumerate(cands):
        if not isinstance(c, UploadFile):
            raise ApiError("validation_error", "candidate must be a file upload", f"candidate[{i}]")
    raw: dict[str, object] = {}
    for name in OPTION_FIELDS:
        values = form.getlist(name)
        if len(values) > 1:
            raise ApiError("validation_error", f"{name} is given more than once", name)
        if values:
            if not isinstance(values[0], str):
                raise ApiError("validation_error", f"{name} must be a text field", name)
            raw[name] = values[0]
    options = _options(raw)
    reference = await refs[0].read()
    candidates = [await c.read() for c in cands if isinstance(c, UploadFile)]
    return DistanceInput(reference, candidates, options, "candidate")


async def _read_json(request: Request, max_candidates: int) -> DistanceInput:
    body = await request.body()
    try:
        doc = DistanceJSON.model_validate_json(body)
    except ValidationError as exc:
        raise ApiError.from_validation(exc) from None
    _check_count(len(doc.candidates), max_candidates, "candidates")
    options = DistanceOptions.model_validate(doc.model_dump(include=set(OPTION_FIELDS)))
    reference = b64decode(doc.reference, "reference")
    candidates = [b64decode(c, f"candidates[{i}]") for i, c in enumerate(doc.candidates)]
    return DistanceInput(reference, candidates, options, "candidates")


def b64decode(text: str, field: str) -> bytes:
    """Standard base64 (whitespace ignored, optional ``data:…;base64,`` prefix) → bytes."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError("invalid_base64", f"{field} is a data URL without ';base64,'", field)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError("invalid_base64", f"{field} is not valid base64: {exc}", field) from None


async def decode_images(rt: Runtime, items: Sequence[tuple[str, bytes]]) -> list[Image]:
    """Decode + resize every ``(field, bytes)`` in the runtime's thread pool, concurrently."""
    loop = asyncio.get_running_loop()
    futures = [loop.run_in_executor(rt.decode_pool, rt.prepare, data) for _, data in items]
    results = await asyncio.gather(*futures, return_exceptions=True)
    images: list[Image] = []
    for (field, _), r in zip(items, results, strict=True):
        if isinstance(r, ImageError):
            raise ApiError.from_image(r, field)
        if isinstance(r, BaseException):
            raise r
        images.append(r)
    return images
