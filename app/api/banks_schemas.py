"""Request and response bodies of the known-items bank endpoints (``/banks/...``), both encodings."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.schemas import Base64Image

#: Bank and item ids: 1-128 characters of letters, digits, ``.``, ``_``, ``-``, ``:``, starting with a
#: letter or digit (safe in paths, logs and metric labels).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
ItemId = Annotated[str, Field(pattern=ID_PATTERN, description="item id (1-128 of A-Za-z0-9._:-)")]


class BankCreate(BaseModel):
    """``PUT /banks/{bank}``: settings of a new bank (JSON; an empty body takes every default)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="model name; default: the service's default")
    threshold: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="near-duplicate threshold; default: the model's threshold from the store",
    )


class BankResponse(BaseModel):
    name: str
    model: str
    threshold: float
    grid: int = Field(description="cells per side of a cells embedding's grid (0: projected)")
    resolution: int = Field(description="working resolution the items are stored at")
    dimension: int = Field(description="embedding length")
    embedding: str = Field(
        description="lower-bound embedding: cells, or projected:<projection digest>"
    )
    items: int
    bytes: int = Field(description="stored bytes: embeddings + resized item images (PNG)")


class ItemJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: ItemId
    image: Base64Image


class ItemsJSON(BaseModel):
    """``POST /banks/{bank}/items`` as JSON."""

    model_config = ConfigDict(extra="forbid")
    items: list[ItemJSON] = Field(min_length=1)


class ItemsForm(BaseModel):
    """The text fields of ``POST /banks/{bank}/items`` as multipart: one ``id`` per ``image`` file,
    in the same order."""

    model_config = ConfigDict(extra="forbid")
    REPEATABLE: ClassVar[frozenset[str]] = frozenset({"id"})
    id: list[ItemId] = Field(
        default_factory=list, description="item ids, one per image file, in the same order"
    )


class ItemStatus(BaseModel):
    id: str
    status: Literal["added", "replaced", "unchanged"] = Field(
        description="added; replaced (the id held another image); unchanged (the same image again)"
    )


class ItemsResponse(BaseModel):
    bank: str
    items: list[ItemStatus]
    size: int = Field(description="items in the bank after this request")
    timing_ms: dict[str, float]


class SearchOptions(BaseModel):
    """Options of ``POST /banks/{bank}/search``, shared by both encodings."""

    model_config = ConfigDict(extra="forbid")
    threshold: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="near-duplicate threshold; default: the bank's",
    )
    limit: int = Field(10, ge=1, le=1000, description="most matches returned (nearest first)")
    max_checked: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="most items given the exact distance (lowest lower bounds first); default: "
        "the service's bank_max_checked. complete=false in the answer when more items survived "
        "the lower bound",
    )
    mirror: bool = Field(
        False,
        description="also match left-right mirrored copies: distance = min over the query and its "
        "mirror (one more trunk pass)",
    )


class SearchJSON(SearchOptions):
    image: Base64Image


class BankMatch(BaseModel):
    id: str
    distance: float
    near_duplicate: bool
    mirrored: bool | None = Field(None, description="with mirror: the query's mirror matched")


class SearchResponse(BaseModel):
    bank: str
    model: str
    threshold: float
    matches: list[BankMatch] = Field(description="items within the threshold, nearest first")
    checked: int = Field(description="items given the exact distance")
    candidates: int = Field(description="items the lower bound could not rule out")
    complete: bool = Field(
        description="every candidate was checked: no item within the threshold is missing"
    )
    timing_ms: dict[str, float]
