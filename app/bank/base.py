"""What every bank storage engine shares: the bank and item records and the interface the bank
service uses (:class:`BankStorage`), implemented by the embedded SQLite + FAISS default
(:mod:`app.bank.storage`) and by Milvus (:mod:`app.bank.milvus`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]  # [N, D] embeddings
Added = Literal["added", "replaced", "unchanged"]


@dataclass(frozen=True)
class BankSpec:
    """A bank's settings, fixed at creation: the model, the near-duplicate threshold, the embedding
    grid, the working resolution its images were stored at, the embedding length, and which
    embedding: ``cells`` (cell means at ``grid``) or ``projected:<digest>`` (the model's projection,
    :mod:`app.bank.projection`; ``grid`` 0)."""

    name: str
    model: str
    threshold: float
    grid: int
    resolution: int
    dim: int
    embedding: str = "cells"


@dataclass(frozen=True)
class BankInfo:
    """A bank's settings with its item count and stored bytes (embeddings + images)."""

    spec: BankSpec
    items: int
    bytes: int


@dataclass(frozen=True)
class NewItem:
    """An item to store: caller's ``id``, content ``digest`` of the resized image, ``embedding`` ``[D]``
    float32 and ``png`` (the resized image, lossless)."""

    id: str
    digest: str
    embedding: Vectors
    png: bytes


class BankStorage(Protocol):
    """What the bank service needs of a storage engine (SQLite + FAISS here, Milvus beside it)."""

    def create(self, spec: BankSpec) -> tuple[BankSpec, bool]: ...
    def info(self, name: str) -> BankInfo | None: ...
    def drop(self, name: str) -> bool: ...
    def upsert(self, name: str, items: Sequence[NewItem]) -> list[Added]: ...
    def remove(self, name: str, item_id: str) -> bool: ...
    def candidates(
        self, name: str, queries: Vectors, radius: float, limit: int
    ) -> tuple[int, list[tuple[str, float]]]: ...
    def images(self, name: str, ids: Sequence[str]) -> dict[str, bytes]: ...
    def names(self) -> list[str]: ...
    def close(self) -> None: ...


class BankNotFound(KeyError):
    """No bank of that name."""
