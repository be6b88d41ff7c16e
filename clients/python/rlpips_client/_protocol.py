"""The wire format shared by :class:`~rlpips_client.Client` and :class:`~rlpips_client.AsyncClient`:
requests as data (:class:`Call`), and responses to results or exceptions. No I/O here."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from rlpips_client._errors import ConnectionFailed, RequestTimeout, RLPIPSError, error_class
from rlpips_client._inputs import FilePart, ImageInput, as_list, form_value, to_part
from rlpips_client._retry import parse_retry_after

REQUEST_ID = "X-Request-ID"
JSON = dict[str, Any]


@dataclass(frozen=True)
class Call:
    """One API call: method, path, multipart file parts and text fields."""

    method: str
    path: str
    files: list[tuple[str, FilePart]] = field(default_factory=list)
    data: Mapping[str, str | list[str]] = field(default_factory=dict)
    json: JSON | None = None

    def send_args(self, request_id: str) -> dict[str, Any]:
        """Keyword arguments of ``httpx.Client.request`` for this call."""
        args: dict[str, Any] = {"headers": {REQUEST_ID: request_id}}
        if self.files:
            args["files"] = self.files
            args["data"] = self.data
        elif self.json is not None:
            args["json"] = self.json
        return args


def new_request_id() -> str:
    """An ``X-Request-ID`` for one call, the same on each of its attempts (the service logs it)."""
    return uuid.uuid4().hex


def auth_headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    """Default headers: ``Authorization: Bearer <key>`` (the service also accepts ``X-API-Key``)."""
    headers = dict(extra or {})
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _options(**options: str | float | bool | Sequence[str] | None) -> dict[str, str]:
    return {k: form_value(v) for k, v in options.items() if v is not None}


def distance_call(
    reference: ImageInput,
    candidates: ImageInput | Sequence[ImageInput],
    **options: str | float | bool | Sequence[str] | None,
) -> Call:
    """``POST /distance`` as multipart: file ``reference``, one file ``candidate`` per candidate."""
    many = as_list(candidates)
    if not many:
        raise ValueError("candidates must hold at least one image")
    files = [("reference", to_part(reference, "reference"))]
    files += [("candidate", to_part(c, f"candidate{i}")) for i, c in enumerate(many)]
    return Call("POST", "/distance", files, _options(**options))


def robustness_call(
    reference: ImageInput,
    candidate: ImageInput | None,
    **options: str | float | bool | Sequence[str] | None,
) -> Call:
    """``POST /robustness-check`` as multipart: file ``reference``, optional file ``candidate``."""
    files = [("reference", to_part(reference, "reference"))]
    if candidate is not None:
        files.append(("candidate", to_part(candidate, "candidate")))
    return Call("POST", "/robustness-check", files, _options(**options))


def _bank(bank: str) -> str:
    return f"/banks/{quote(bank, safe='')}"


def bank_create_call(bank: str, model: str | None, threshold: float | None) -> Call:
    """``PUT /banks/{bank}`` with the settings given (JSON)."""
    body = {k: v for k, v in {"model": model, "threshold": threshold}.items() if v is not None}
    return Call("PUT", _bank(bank), json=body)


def bank_add_call(bank: str, items: Mapping[str, ImageInput]) -> Call:
    """``POST /banks/{bank}/items`` as multipart: one ``image`` file and one ``id`` per item."""
    if not items:
        raise ValueError("items must hold at least one image")
    files = [("image", to_part(img, f"item{i}")) for i, img in enumerate(items.values())]
    return Call("POST", f"{_bank(bank)}/items", files, {"id": list(items)})


def bank_item_call(bank: str, item: str) -> Call:
    """``DELETE /banks/{bank}/items/{item}``."""
    return Call("DELETE", f"{_bank(bank)}/items/{quote(item, safe='')}")


def bank_search_call(
    bank: str, image: ImageInput, **options: str | float | bool | Sequence[str] | None
) -> Call:
    """``POST /banks/{bank}/search`` as multipart: file ``image`` and the options."""
    files = [("image", to_part(image, "image"))]
    return Call("POST", f"{_bank(bank)}/search", files, dict(_options(**options)))


def response_id(response: httpx.Response, sent: str) -> str:
    """The service's echo of the request ID, else the one sent."""
    return response.headers.get(REQUEST_ID) or sent


def error_from(response: httpx.Response, request_id: str) -> RLPIPSError:
    """The exception for an error response: the service's ``{"error": {code, message, field}}``, or
    ``http_<status>`` with the start of the body for anything else (e.g. a proxy's HTML page)."""
    status = response.status_code
    body: JSON | None = None
    try:
        parsed = response.json()
        body = parsed if isinstance(parsed, dict) else None
    except ValueError:
        pass
    err = body.get("error") if body else None
    if isinstance(err, dict) and isinstance(err.get("code"), str):
        code, message, fld = err["code"], str(err.get("message", "")), err.get("field")
    else:
        code, message, fld = f"http_{status}", response.text[:200].strip(), None
    return error_class(status)(
        status,
        code,
        message or response.reason_phrase,
        response_id(response, request_id),
        field=fld if isinstance(fld, str) else None,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        body=body,
    )


def transport_error(exc: httpx.TransportError, request_id: str) -> RLPIPSError:
    """The exception for a call that got no response."""
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):
        return RequestTimeout(None, "timeout", f"no answer in time: {exc}", request_id)
    return ConnectionFailed(None, "connection_error", f"{type(exc).__name__}: {exc}", request_id)


def json_of(response: httpx.Response, request_id: str) -> JSON:
    """The JSON object of a successful response (a body that is not one is a :class:`RLPIPSError`)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise RLPIPSError(
            response.status_code,
            "invalid_response",
            "the response is not a JSON object",
            response_id(response, request_id),
        )
    return body
