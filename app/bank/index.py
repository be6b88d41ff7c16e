"""A bank's in-memory state: its FAISS index (``IndexIDMap2(IndexFlatL2)`` keyed by SQLite row
number) and the maps between rows and item ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from app.bank.base import BankSpec


@dataclass
class LiveBank:
    """A bank's in-memory state: its index, row → item id, and counters."""

    spec: BankSpec
    index: faiss.IndexIDMap2
    ids: dict[int, str]
    seq_of: dict[str, int]
    bytes: int
    #: stored bytes of each row (embedding + PNG), so a replica can account for a removal
    sizes: dict[int, int] = field(default_factory=dict)


def new_index(dim: int) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.IndexFlatL2(dim))


def add_vectors(index: faiss.IndexIDMap2, seqs: list[int], vecs: list[bytes], dim: int) -> None:
    x = np.frombuffer(b"".join(vecs), dtype=np.float32).reshape(len(vecs), dim)
    index.add_with_ids(x, np.asarray(seqs, dtype=np.int64))


def remove_ids(index: faiss.IndexIDMap2, seqs: list[int]) -> None:
    ids: Any = np.asarray(seqs, dtype=np.int64)  # the SWIG wrapper takes an id array
    index.remove_ids(ids)
