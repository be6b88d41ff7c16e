"""The known-items bank endpoints: ``/banks/{bank}`` (create, read, delete), ``/banks/{bank}/items``
(add, remove) and ``/banks/{bank}/search``. The pipeline lives in :mod:`app.bank.service`; this module
reads bodies (both encodings), maps errors and builds the typed answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import ValidationError

from app.api.banks_schemas import (
    ID_PATTERN,
    BankCreate,
    BankMatch,
    BankResponse,
    ItemsForm,
    ItemsJSON,
    ItemsResponse,
    ItemStatus,
    SearchJSON,
    SearchOptions,
    SearchResponse,
)
from app.api.bodies import BANK_ERRORS, ITEMS_BODY, SEARCH_BODY
from app.api.deps import ReadyRuntime, loaded_model, time_left
from app.api.errors import ApiError
from app.api.inputs import ImageField, b64decode, media_type, read_body
from app.bank.base import BankInfo, BankNotFound
from app.bank.service import BankConflict, BankService

router = APIRouter(tags=["banks"])

BankName = Annotated[
    str, Path(pattern=ID_PATTERN, description="bank name (1-128 of A-Za-z0-9._:-)")
]
ItemName = Annotated[str, Path(pattern=ID_PATTERN, description="item id")]

ITEM_FIELDS = (ImageField("image", "items", many=True),)
SEARCH_FIELDS = (ImageField("image", "image"),)


def bank_service(request: Request, rt: ReadyRuntime) -> BankService:
    """The app's bank service (503 ``not_ready`` until the lifespan opened the storage)."""
    svc: BankService | None = getattr(request.app.state, "banks", None)
    if svc is None:
        raise ApiError("not_ready", "the bank storage is not open yet")
    return svc


Banks = Annotated[BankService, Depends(bank_service)]


@contextmanager
def _errors(bank: str) -> Iterator[None]:
    """Domain errors of the bank service as API errors."""
    try:
        yield
    except BankNotFound:
        raise ApiError("not_found", f"there is no bank {bank!r}", "bank") from None
    except BankConflict as exc:
        raise ApiError("conflict", str(exc), "bank") from None


def _bank(info: BankInfo) -> BankResponse:
    s = info.spec
    return BankResponse(
        name=s.name,
        model=s.model,
        threshold=s.threshold,
        grid=s.grid,
        resolution=s.resolution,
        dimension=s.dim,
        embedding=s.embedding,
        items=info.items,
        bytes=info.bytes,
    )


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError("invalid_json", f"the body is not valid JSON: {exc}") from None


@router.put(
    "/banks/{bank}",
    response_model=BankResponse,
    responses={201: {"model": BankResponse, "description": "created"}, **BANK_ERRORS},
    summary="Create a known-items bank (201), or confirm one with the same settings (200)",
)
async def create_bank(
    bank: BankName, request: Request, response: Response, rt: ReadyRuntime, svc: Banks
) -> BankResponse:
    """JSON ``{"model", "threshold"}``, both optional (an empty body takes the defaults). A bank that
    exists with other settings is a 409 ``conflict``."""
    raw = await request.body()
    try:
        opts = BankCreate.model_validate(_json(raw) if raw.strip() else {}, strict=True)
    except ValidationError as exc:
        raise ApiError.from_validation(exc) from None
    model = loaded_model(rt, opts.model)
    with _errors(bank):
        info, created = await svc.create(bank, model, opts.threshold)
    response.status_code = 201 if created else 200
    return _bank(info)


@router.get("/banks/{bank}", response_model=BankResponse, responses=BANK_ERRORS)
async def get_bank(bank: BankName, svc: Banks) -> BankResponse:
    """The bank's settings, item count and stored bytes."""
    with _errors(bank):
        return _bank(svc.info(bank))


@router.delete("/banks/{bank}", status_code=204, responses=BANK_ERRORS)
async def delete_bank(bank: BankName, svc: Banks) -> Response:
    """Delete the bank and every item in it."""
    with _errors(bank):
        await svc.drop(bank)
    svc.rt.telemetry.bank_size(bank, None)
    return Response(status_code=204)


async def _items(request: Request, max_items: int) -> tuple[list[str], list[tuple[str, bytes]]]:
    """``(ids, (name, image bytes))`` from either encoding."""
    if media_type(request) == "multipart/form-data":
        body = await read_body(request, ITEM_FIELDS, ItemsJSON, ItemsForm, max_items)
        ids = body.options.id
        if len(ids) != len(body.images):
            raise ApiError(
                "validation_error",
                f"{len(body.images)} image files but {len(ids)} id fields; give one id per image",
                "id",
            )
    else:
        if not (
            media_type(request) in ("application/json", "") or media_type(request).endswith("+json")
        ):
            raise ApiError("unsupported_media_type", "send multipart/form-data or application/json")
        try:
            doc = ItemsJSON.model_validate(_json(await request.body()), strict=True)
        except ValidationError as exc:
            raise ApiError.from_validation(exc) from None
        if len(doc.items) > max_items:
            raise ApiError(
                "validation_error",
                f"{len(doc.items)} items given; at most {max_items} per request",
                "items",
            )
        ids = [it.id for it in doc.items]
        images = [
            (f"items[{i}].image", b64decode(it.image, f"items[{i}].image"))
            for i, it in enumerate(doc.items)
        ]
        return ids, images
    return ids, body.images


@router.post(
    "/banks/{bank}/items",
    response_model=ItemsResponse,
    responses=BANK_ERRORS,
    openapi_extra=ITEMS_BODY,
    summary="Add images to a bank under caller-chosen ids (idempotent per id)",
)
async def add_items(
    bank: BankName, request: Request, rt: ReadyRuntime, svc: Banks
) -> ItemsResponse:
    """JSON ``{"items": [{"id", "image"}]}`` or multipart: repeated ``image`` files and ``id`` fields
    in the same order. Acknowledged once stored durably; an id given again with the same image is
    ``unchanged``, with another image ``replaced``."""
    started = time.perf_counter()
    with _errors(bank):
        svc.spec(bank)  # 404 before reading images
    ids, inputs = await _items(request, rt.settings.bank_max_items)
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ApiError("validation_error", f"id {dup!r} is given more than once", "id")
    t0 = time.perf_counter()
    images = await rt.decode(inputs, time_left(started, rt.settings.deadline_s))
    decode_ms = (time.perf_counter() - t0) * 1e3
    with _errors(bank):
        statuses, timing = await svc.add(bank, ids, images)
        size = svc.info(bank).items
    timing = {"decode": decode_ms, **timing, "total": (time.perf_counter() - started) * 1e3}
    return ItemsResponse(
        bank=bank,
        items=[ItemStatus(id=i, status=s) for i, s in zip(ids, statuses, strict=True)],
        size=size,
        timing_ms=timing,
    )


@router.delete("/banks/{bank}/items/{item}", status_code=204, responses=BANK_ERRORS)
async def delete_item(bank: BankName, item: ItemName, svc: Banks) -> Response:
    """Remove one item (404 ``not_found`` when the bank or the item is unknown)."""
    with _errors(bank):
        removed = await svc.remove(bank, item)
    if not removed:
        raise ApiError("not_found", f"bank {bank!r} has no item {item!r}", "item")
    return Response(status_code=204)


@router.post(
    "/banks/{bank}/search",
    response_model=SearchResponse,
    response_model_exclude_none=True,
    responses=BANK_ERRORS,
    openapi_extra=SEARCH_BODY,
    summary="The bank's items within the threshold of an image, nearest first",
)
async def search(bank: BankName, request: Request, rt: ReadyRuntime, svc: Banks) -> SearchResponse:
    """Multipart (file ``image`` + option fields) or JSON (``image`` base64 + options)."""
    started = time.perf_counter()
    with _errors(bank):
        spec = svc.spec(bank)
    body = await read_body(request, SEARCH_FIELDS, SearchJSON, SearchOptions, 1)
    opts = body.options
    t0 = time.perf_counter()
    (image,) = await rt.decode(body.images, time_left(started, rt.settings.deadline_s))
    decode_ms = (time.perf_counter() - t0) * 1e3
    max_checked = opts.max_checked or rt.settings.bank_max_checked
    with _errors(bank):
        res = await svc.search(bank, image, opts.threshold, opts.limit, max_checked, opts.mirror)
    total_s = time.perf_counter() - started
    rt.telemetry.bank_searched(bank, res.checked, total_s)
    return SearchResponse(
        bank=bank,
        model=spec.model,
        threshold=res.threshold,
        matches=[
            BankMatch(
                id=m.id,
                distance=m.distance,
                near_duplicate=m.near_duplicate,
                mirrored=m.mirrored if opts.mirror else None,
            )
            for m in res.matches
        ],
        checked=res.checked,
        candidates=res.candidates,
        complete=res.complete,
        timing_ms={"decode": decode_ms, **res.timing_ms, "total": total_s * 1e3},
    )
