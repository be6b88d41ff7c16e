"""Request and response bodies of the API (pydantic), with the OpenAPI examples."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

_PNG_1PX = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"
)


#: A base64-encoded image (standard alphabet; a ``data:…;base64,`` prefix is accepted too).
Base64Image = Annotated[str, Field(json_schema_extra={"format": "byte"})]


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str = Field(examples=["the data is not an image in a known format"])
    field: str | None = Field(None, examples=["candidate[1]"])
    error_id: str | None = Field(None, description="only for internal_error; appears in the log")


class ErrorBody(BaseModel):
    error: ErrorDetail


class DistanceOptions(BaseModel):
    """Options shared by both encodings of ``POST /distance``."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="model name (GET /models); default: the service's default model"
    )
    threshold: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="near-duplicate threshold; default: the model's threshold from the store",
    )
    spatial: bool = Field(False, description="include a spatial heat map (base64 PNG) per pair")
    per_layer: bool = Field(False, description="include the per-layer distances")


class DistanceJSON(DistanceOptions):
    """``POST /distance`` as ``application/json``: images as base64 (a ``data:`` URL prefix is allowed)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"reference": _PNG_1PX, "candidates": [_PNG_1PX], "model": "lpips-alex"}]
        },
    )

    reference: Base64Image = Field(description="base64-encoded image")
    candidates: list[Base64Image] = Field(min_length=1, description="base64-encoded images (1..N)")


class PairResult(BaseModel):
    distance: float = Field(ge=0, examples=[0.1834])
    near_duplicate: bool = Field(description="distance <= threshold")
    per_layer: list[float] | None = Field(None, description="only with per_layer=true")
    spatial_png: str | None = Field(None, description="base64 PNG heat map; only with spatial=true")


class Timing(BaseModel):
    decode: float
    queue: float
    inference: float
    total: float


class DistanceResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "lpips-alex",
                    "resolution": [256, 256],
                    "threshold": 0.2,
                    "results": [
                        {"distance": 0.0412, "near_duplicate": True},
                        {"distance": 0.6731, "near_duplicate": False},
                    ],
                    "timing_ms": {"decode": 9.1, "queue": 3.2, "inference": 41.7, "total": 55.4},
                }
            ]
        }
    )

    model: str
    resolution: list[int] = Field(
        min_length=2, max_length=2, description="[H, W] the images were resized to"
    )
    threshold: float
    results: list[PairResult] = Field(description="one per candidate, in candidate order")
    timing_ms: Timing


class ModelFile(BaseModel):
    path: str = Field(description="file name in the store or the offline weights folder")
    sha256: str | None = Field(description="sha256 of the verified copy (or the manifest's)")
    available: bool


class ModelInfo(BaseModel):
    name: str
    trunk: str = Field(examples=["alex"])
    variant: str
    source: str
    files: list[ModelFile]
    threshold: float
    loaded: bool
    default: bool


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class Status(BaseModel):
    status: str = Field(examples=["ok"])


def _error_example(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if field:
        err["field"] = field
    return {"model": ErrorBody, "content": {"application/json": {"example": {"error": err}}}}


#: Documented error responses of POST endpoints.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error_example(
        "invalid_image", "cannot decode the image: broken data stream", "candidate[0]"
    ),
    401: _error_example("unauthorized", "a valid API key is required: send 'Authorization: …'"),
    413: _error_example("image_too_large", "image is 9000x9000 = 81000000 pixels, over the limit"),
    415: _error_example("unsupported_media_type", "use multipart/form-data or application/json"),
    422: _error_example("validation_error", "threshold: must be ≥ 0", "threshold"),
    429: _error_example("overloaded", "admission queue full (256 of 256 queued)"),
    500: _error_example("internal_error", "an internal error occurred; quote error_id …"),
    503: _error_example("not_ready", "models are not loaded yet"),
    504: _error_example("deadline_exceeded", "the request waited past its deadline"),
}

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
                        "reference": {"type": "string", "format": "binary"},
                        "candidate": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "repeat the field for several candidates",
                        },
                        "model": {"type": "string"},
                        "threshold": {"type": "number", "minimum": 0},
                        "spatial": {"type": "boolean", "default": False},
                        "per_layer": {"type": "boolean", "default": False},
                    },
                },
                "encoding": {"candidate": {"style": "form", "explode": True}},
            },
            "application/json": {
                "schema": DistanceJSON.model_json_schema(),
                "example": {"reference": _PNG_1PX, "candidates": [_PNG_1PX], "per_layer": True},
            },
        },
    }
}
