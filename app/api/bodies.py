"""The OpenAPI descriptions that pydantic cannot derive: the request bodies in both encodings (the
routes read the raw request) and the documented errors, one named example per error code."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.api.banks_schemas import ID_PATTERN, ItemsJSON, SearchJSON, SearchOptions
from app.api.errors import STATUS
from app.api.schemas import (
    PNG_1PX,
    DistanceJSON,
    DistanceOptions,
    ErrorBody,
    RobustnessJSON,
    RobustnessOptions,
)
from app.attacks.robustness import MAX_SEED
from app.metric.queries import INVARIANCES

#: One example per error code that an operation can answer with: ``(message, field)``.
ERROR_EXAMPLES: dict[str, tuple[str, str | None]] = {
    "invalid_image": ("cannot decode the image: broken data stream", "candidate[0]"),
    "invalid_base64": ("candidates[0] is not valid base64: Incorrect padding", "candidates[0]"),
    "invalid_json": ("the body is not valid JSON: Expecting value at line 1 column 1", None),
    "invalid_multipart": ("cannot parse the multipart body: missing closing boundary", None),
    "bad_request": ("invalid HTTP request: invalid header value", None),
    "unauthorized": ("a valid API key is required: send 'Authorization: Bearer <key>' …", None),
    "request_timeout": ("the request body did not arrive within 60 s", None),
    "payload_too_large": ("the request body is over the limit of 33554432 bytes", None),
    "image_too_large": ("image is 9000x9000 = 81000000 pixels, over the limit", "reference"),
    "unsupported_media_type": ("use multipart/form-data or application/json", None),
    "headers_too_large": ("the request headers are over 65536 bytes", None),
    "not_found": ("there is no bank 'known-items'", "bank"),
    "conflict": ("bank 'known-items' exists with model 'lpips-alex' and threshold 0.3", "bank"),
    "validation_error": ("threshold: Input should be greater than or equal to 0", "threshold"),
    "overloaded": ("admission queue full (256 of 256 queued); see Retry-After", None),
    "internal_error": ("an internal error occurred; quote error_id 3f2c… to the operator", None),
    "not_ready": ("the models are not loaded and warmed yet", None),
    "draining": ("the service is shutting down", None),
    "deadline_exceeded": ("the request waited past its deadline", None),
}

#: Codes that no operation answers with, described in the API's description instead: unknown paths
#: and methods, and a client that went away (logged and counted, never received).
UNDOCUMENTED_CODES = frozenset({"method_not_allowed", "client_closed_request"})


def _example(code: str) -> dict[str, Any]:
    message, field = ERROR_EXAMPLES[code]
    err: dict[str, Any] = {"code": code, "message": message}
    if field:
        err["field"] = field
    return {"summary": code, "value": {"error": err}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of an operation for ``statuses``: the error body and, for each status, one
    example per code that maps to it."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        codes = [c for c, s in STATUS.items() if s == status and c in ERROR_EXAMPLES]
        examples = {c: _example(c) for c in codes}
        out[status] = {
            "model": ErrorBody,
            "description": ", ".join(f"`{c}`" for c in codes),
            "content": {"application/json": {"examples": examples}},
        }
    return out


#: Documented error responses of the POST endpoints.
ERROR_RESPONSES = error_responses(400, 401, 408, 413, 415, 422, 429, 431, 500, 503, 504)
#: Documented error responses of the bank endpoints.
BANK_ERRORS = error_responses(400, 401, 404, 408, 409, 413, 415, 422, 429, 431, 500, 503, 504)


def _form_field(kind: str, **schema: Any) -> dict[str, Any]:
    return {"type": kind, **schema}


def _descriptions(*models: type[BaseModel]) -> dict[str, str]:
    """Each option's description from the pydantic models (one wording for both encodings)."""
    return {
        name: f.description or ""
        for m in models
        for name, f in m.model_fields.items()
        if f.description
    }


def _invariance(descriptions: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "array",
        "items": {"type": "string", "enum": list(INVARIANCES)},
        "description": descriptions["invariance"] + "; repeat the field, or comma-separate",
    }


_D = _descriptions(DistanceOptions)
_R = _descriptions(RobustnessOptions)

#: ``POST /distance`` request body in both encodings (the route reads the raw request).
DISTANCE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["reference", "candidate"],
                    "properties": {
                        "reference": _form_field(
                            "string", format="binary", description="the reference image file"
                        ),
                        "candidate": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "candidate image files: repeat the field for several",
                        },
                        "model": _form_field("string", description=_D["model"]),
                        "threshold": _form_field("number", minimum=0, description=_D["threshold"]),
                        "spatial": _form_field("boolean", default=False, description=_D["spatial"]),
                        "spatial_scale": _form_field(
                            "string",
                            enum=["pair", "shared"],
                            default="pair",
                            description=_D["spatial_scale"],
                        ),
                        "per_layer": _form_field(
                            "boolean", default=False, description=_D["per_layer"]
                        ),
                        "invariance": _invariance(_D),
                    },
                },
                "encoding": {
                    "candidate": {"style": "form", "explode": True},
                    "invariance": {"style": "form", "explode": True},
                },
            },
            "application/json": {
                "schema": DistanceJSON.model_json_schema(),
                "example": {"reference": PNG_1PX, "candidates": [PNG_1PX], "per_layer": True},
            },
        },
    }
}


#: ``POST /robustness-check`` request body in both encodings (the route reads the raw request).
ROBUSTNESS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["reference"],
                    "properties": {
                        "reference": _form_field(
                            "string", format="binary", description="the reference image file"
                        ),
                        "candidate": _form_field(
                            "string",
                            format="binary",
                            description="the image to attack; absent: attack the reference",
                        ),
                        "models": _form_field(
                            "string", description=_R["models"] + " (comma-separated names)"
                        ),
                        "attack": _form_field(
                            "string", enum=["linf", "l2"], description=_R["attack"]
                        ),
                        "epsilon": _form_field(
                            "number", minimum=0, maximum=1, description=_R["epsilon"]
                        ),
                        "steps": _form_field("integer", minimum=1, description=_R["steps"]),
                        "step_size": _form_field(
                            "number", exclusiveMinimum=0, maximum=1, description=_R["step_size"]
                        ),
                        "goal": _form_field(
                            "string", enum=["evade", "impersonate"], description=_R["goal"]
                        ),
                        "random_start": _form_field("boolean", description=_R["random_start"]),
                        "seed": _form_field(
                            "integer", minimum=0, maximum=MAX_SEED, description=_R["seed"]
                        ),
                        "threshold": _form_field("number", minimum=0, description=_R["threshold"]),
                        "return_adversarial": _form_field(
                            "boolean", description=_R["return_adversarial"]
                        ),
                        "invariance": _invariance(_R),
                    },
                }
            },
            "application/json": {
                "schema": RobustnessJSON.model_json_schema(),
                "example": {"reference": PNG_1PX, "steps": 10, "seed": 0},
            },
        },
    }
}


_S = _descriptions(SearchOptions)

#: ``POST /banks/{bank}/items`` request body in both encodings.
ITEMS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "id"],
                    "properties": {
                        "image": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "item image files: repeat the field for several",
                        },
                        "id": {
                            "type": "array",
                            "items": {"type": "string", "pattern": ID_PATTERN},
                            "description": "one id per image file, in the same order",
                        },
                    },
                },
                "encoding": {
                    "image": {"style": "form", "explode": True},
                    "id": {"style": "form", "explode": True},
                },
            },
            "application/json": {
                "schema": ItemsJSON.model_json_schema(),
                "example": {"items": [{"id": "a1", "image": PNG_1PX}]},
            },
        },
    }
}

#: ``POST /banks/{bank}/search`` request body in both encodings.
SEARCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": _form_field(
                            "string", format="binary", description="the image to look up"
                        ),
                        "threshold": _form_field("number", minimum=0, description=_S["threshold"]),
                        "limit": _form_field("integer", minimum=1, description=_S["limit"]),
                        "max_checked": _form_field(
                            "integer", minimum=1, description=_S["max_checked"]
                        ),
                        "mirror": _form_field("boolean", default=False, description=_S["mirror"]),
                    },
                }
            },
            "application/json": {
                "schema": SearchJSON.model_json_schema(),
                "example": {"image": PNG_1PX, "limit": 5},
            },
        },
    }
}
