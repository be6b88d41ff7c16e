"""The input stage of every endpoint: a request body (multipart or JSON) → named image bytes + options.

One reader for all endpoints, driven by a description of the body: its image fields
(:class:`ImageField`), the JSON model of the whole body and the options model shared by both
encodings. Every problem becomes an :class:`~app.api.errors.ApiError` naming the field (``reference``,
``candidate[i]`` in multipart, ``candidates[i]`` in JSON, or the option).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import ApiError

O = TypeVar("O", bound=BaseModel)  # noqa: E741


@dataclass(frozen=True)
class ImageField:
    """An image field of a body: its multipart file field, its JSON key, whether it holds a list
    (a repeated file field / a JSON array, whose items errors name as ``candidate[1]``) and whether it
    is required (a list then needs at least one item)."""

    form: str
    json: str
    many: bool = False
    required: bool = True


@dataclass(frozen=True)
class Body(Generic[O]):
    """A read body: ``images`` as ``(name, bytes)`` in field order (list items in order), the
    ``options`` and how many images each field gave (``counts``, by multipart name)."""

    images: list[tuple[str, bytes]]
    options: O
    counts: dict[str, int]


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(
    request: Request,
    fields: Sequence[ImageField],
    json_model: type[BaseModel],
    options: type[O],
    max_items: int,
) -> Body[O]:
    """Read ``request`` by its content type (415 for anything but multipart or JSON); a list field
    holds at most ``max_items`` images."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        limit = sum(max_items if f.many else 1 for f in fields)
        form = await _read_form(request, max_files=limit + 8)
        try:
            return await _from_form(form, fields, options, max_items)
        finally:
            await form.close()
    if kind == "application/json" or kind.endswith("+json"):
        return _from_json(await request.body(), fields, json_model, options, max_items)
    raise ApiError(
        "unsupported_media_type",
        f"content type {kind or '(none)'!r} is not supported; "
        "send multipart/form-data or application/json",
    )


def _check_count(f: ImageField, n: int, max_items: int, name: str) -> None:
    if f.many:
        if f.required and n < 1:
            raise ApiError("validation_error", f"at least one {f.form} is required", name)
        if n > max_items:
            raise ApiError(
                "validation_error", f"{n} {f.json} given; at most {max_items} per request", name
            )
    elif n > 1 or (f.required and n < 1):
        rule = "exactly one" if f.required else "at most one"
        raise ApiError("validation_error", f"{rule} file field {f.form!r} is allowed", name)


def _validated(model: type[O], raw: object) -> O:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ApiError.from_validation(exc) from None


# -- multipart ---------------------------------------------------------------------------------


async def _read_form(request: Request, max_files: int) -> FormData:
    """The multipart form (400 ``invalid_multipart`` when it cannot be parsed); close it after use."""
    try:
        return await request.form(max_files=max_files, max_fields=32)
    except StarletteHTTPException as exc:
        raise ApiError(
            "invalid_multipart", f"cannot parse the multipart body: {exc.detail}"
        ) from None


async def _from_form(
    form: FormData, fields: Sequence[ImageField], options: type[O], max_items: int
) -> Body[O]:
    names = [f.form for f in fields] + list(options.model_fields)
    unknown = sorted(set(form.keys()) - set(names))
    if unknown:
        raise ApiError(
            "validation_error",
            f"unknown field {unknown[0]!r}; expected {', '.join(names)}",
            unknown[0],
        )
    uploads: list[tuple[str, UploadFile]] = []
    counts: dict[str, int] = {}
    for f in fields:
        values = form.getlist(f.form)
        _check_count(f, len(values), max_items, f.form)
        counts[f.form] = len(values)
        for i, v in enumerate(values):
            name = f"{f.form}[{i}]" if f.many else f.form
            if not isinstance(v, UploadFile):
                raise ApiError("validation_error", f"{f.form} must be a file upload", name)
            uploads.append((name, v))
    opts = _validated(options, _form_options(form, options))
    return Body([(name, await u.read()) for name, u in uploads], opts, counts)


def _form_options(form: FormData, options: type[BaseModel]) -> dict[str, object]:
    """The option fields of ``form`` as text; only the model's ``REPEATABLE`` ones may repeat."""
    repeatable: frozenset[str] = getattr(options, "REPEATABLE", frozenset())
    raw: dict[str, object] = {}
    for name in options.model_fields:
        values = form.getlist(name)
        if not values:
            continue
        if not all(isinstance(v, str) for v in values):
            raise ApiError("validation_error", f"{name} must be a text field", name)
        if len(values) > 1 and name not in repeatable:
            raise ApiError("validation_error", f"{name} is given more than once", name)
        raw[name] = values if name in repeatable else values[0]
    return raw


# -- JSON --------------------------------------------------------------------------------------


def _from_json(
    body: bytes,
    fields: Sequence[ImageField],
    json_model: type[BaseModel],
    options: type[O],
    max_items: int,
) -> Body[O]:
    try:
        doc = json_model.model_validate_json(body)
    except ValidationError as exc:
        raise ApiError.from_validation(exc) from None
    images: list[tuple[str, bytes]] = []
    counts: dict[str, int] = {}
    for f in fields:
        value = getattr(doc, f.json)
        items: list[str] = (value if f.many else [value]) if value is not None else []
        _check_count(f, len(items), max_items, f.json)
        counts[f.form] = len(items)
        for i, text in enumerate(items):
            name = f"{f.json}[{i}]" if f.many else f.json
            images.append((name, b64decode(text, name)))
    opts = options.model_validate(doc.model_dump(include=set(options.model_fields)))
    return Body(images, opts, counts)


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
