"""The input stage of every endpoint: a request body (multipart or JSON) → named image bytes + options.

One reader for all endpoints, driven by a description of the body: its image fields
(:class:`ImageField`), the JSON model of the whole body and the options model shared by both
encodings. Every problem becomes an :class:`~app.api.errors.ApiError` naming the field (``reference``,
``candidate[i]`` in multipart, ``candidates[i]`` in JSON, or the option).

Types are strict in both encodings: JSON values must have the schema's type (``"0.5"``, ``true`` or
``0`` are not numbers or booleans), a repeated JSON key is an error, and a multipart option's text is
read as a JSON scalar (``0.5``, ``true``, ``3``) for the fields that are not text. A multipart body must
end with its closing boundary.
"""

from __future__ import annotations

import base64
import binascii
import json
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, Union, get_args, get_origin

from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

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
        form = await _read_form(request, limit + 8, _many_field(fields, max_items))
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
        return model.model_validate(raw, strict=True)
    except ValidationError as exc:
        raise ApiError.from_validation(exc) from None


# -- multipart ---------------------------------------------------------------------------------


def _many_field(fields: Sequence[ImageField], max_items: int) -> ApiError:
    """The error for a multipart body with more files than any valid request has."""
    many = next((f for f in fields if f.many), fields[-1])
    return ApiError(
        "validation_error",
        f"too many files: at most {max_items} {many.json} per request",
        many.form,
    )


class _ClosingBoundary:
    """Wraps ``receive`` to notice whether the body contains the multipart closing delimiter."""

    def __init__(self, request: Request) -> None:
        _, params = parse_options_header(request.headers.get("content-type", ""))
        self.delimiter = b"--" + params.get(b"boundary", b"") + b"--"
        self.seen = len(self.delimiter) <= 4  # no boundary: the parser reports it
        self._tail = b""
        self._receive = request.receive

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request" and not self.seen:
            window = self._tail + message.get("body", b"")
            self.seen = self.delimiter in window
            self._tail = window[-len(self.delimiter) :]
        return message


async def _read_form(request: Request, max_files: int, too_many: ApiError) -> FormData:
    """The multipart form (400 ``invalid_multipart`` when it cannot be parsed or is truncated,
    ``too_many`` when it holds more than ``max_files`` files); close it after use."""
    watch = _ClosingBoundary(request)
    try:
        form = await Request(request.scope, watch.receive).form(max_files=max_files, max_fields=32)
    except StarletteHTTPException as exc:
        if str(exc.detail).startswith(("Too many files", "Too many fields")):
            raise too_many from None
        raise ApiError(
            "invalid_multipart", f"cannot parse the multipart body: {exc.detail}"
        ) from None
    if not watch.seen:
        await form.close()
        raise ApiError(
            "invalid_multipart",
            "the multipart body ends without its closing boundary (truncated?)",
        )
    return form


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


def _is_text(annotation: Any) -> bool:
    """Whether a field of this type takes the text of a form field as it is (``str``, a ``Literal``
    of strings, optional or not)."""
    if annotation is str:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return all(isinstance(a, str) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return all(_is_text(a) for a in get_args(annotation) if a is not type(None))
    return False


def _scalar(text: str) -> object:
    """A form field's text as the JSON scalar it spells (``"0.5"`` → 0.5, ``"true"`` → True), or the
    text itself (then strict validation names the field). NaN and infinities stay text."""
    try:
        value: object = json.loads(text, parse_constant=lambda _c: text)
    except ValueError:
        return text
    return value if isinstance(value, bool | int | float) else text


def _form_options(form: FormData, options: type[BaseModel]) -> dict[str, object]:
    """The option fields of ``form``; only the model's ``REPEATABLE`` ones may repeat."""
    repeatable: frozenset[str] = getattr(options, "REPEATABLE", frozenset())
    raw: dict[str, object] = {}
    for name, info in options.model_fields.items():
        values = form.getlist(name)
        if not values:
            continue
        texts = [v for v in values if isinstance(v, str)]
        if len(texts) != len(values):
            raise ApiError("validation_error", f"{name} must be a text field", name)
        if name in repeatable:
            raw[name] = texts
        elif len(texts) > 1:
            raise ApiError("validation_error", f"{name} is given more than once", name)
        else:
            raw[name] = texts[0] if _is_text(info.annotation) else _scalar(texts[0])
    return raw


# -- JSON --------------------------------------------------------------------------------------


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key given twice in one JSON object."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ApiError("validation_error", f"{key} is given more than once", key)
        out[key] = value
    return out


def _parse_json(body: bytes) -> object:
    try:
        return json.loads(body, object_pairs_hook=_no_repeats)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError("invalid_json", f"the body is not valid JSON: {exc}") from None


def _from_json(
    body: bytes,
    fields: Sequence[ImageField],
    json_model: type[BaseModel],
    options: type[O],
    max_items: int,
) -> Body[O]:
    doc = _validated(json_model, _parse_json(body))
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


#: ``data:`` URL media types accepted for an image (none given means ``text/plain`` by RFC 2397, but
#: clients that omit it mean "bytes"): images, and opaque bytes.
_DATA_TYPES = ("image/", "application/octet-stream")


def b64decode(text: str, field: str) -> bytes:
    """Standard base64 (whitespace ignored, optional ``data:…;base64,`` prefix) → bytes."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError("invalid_base64", f"{field} is a data URL without ';base64,'", field)
        kind = head[5:].split(";")[0].strip().lower()
        if kind and not kind.startswith(_DATA_TYPES):
            raise ApiError(
                "unsupported_media_type",
                f"{field} is a data URL of type {kind!r}; an image is expected",
                field,
            )
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError("invalid_base64", f"{field} is not valid base64: {exc}", field) from None
