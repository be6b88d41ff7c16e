"""The bank storage on Milvus (``pymilvus``): the same :class:`~app.bank.storage.BankStorage` interface
as the embedded SQLite + FAISS default, for banks beyond one machine and for replicas that share one
engine. Tested against milvus-lite (the same engine embedded in a file, ``uri`` a path); a server or
cluster is ``uri="http://host:19530"``.

Layout: a catalogue collection ``rlpips_banks`` (one row per bank: its spec as JSON) and one collection
per bank (named by a hash of the bank's name: bank names allow ``.``, ``:`` and ``-``, collection
names do not) with the item id (primary key), content digest, embedding (``FLOAT_VECTOR``, FLAT
index, L2 — Milvus's L2 is the squared distance, as FAISS's), stored bytes, and the resized item PNG
as base64 text. Every collection uses strong consistency, so an acknowledged add is seen by every
later search. Limits of this engine here: a PNG must fit a ``VARCHAR`` (65,535 characters: about
48 KB of PNG, enough at 64² and typical at 128², not at 256² — a deployment keeps item images in an
object store keyed by digest), and a range search returns at most 16,384 items, so the ``candidates``
count saturates there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from app.bank.base import Added, BankInfo, BankNotFound, BankSpec, NewItem, Vectors

CATALOGUE = "rlpips_banks"
#: Milvus's largest top-k: a range search returns at most this many items.
MAX_TOPK = 16384
PNG_CHARS = 65535


def _collection(name: str) -> str:
    return "bank_" + hashlib.blake2b(name.encode(), digest_size=16).hexdigest()


def _quote(values: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


class MilvusStorage:
    """Banks in Milvus at ``uri`` (a milvus-lite file path, or a server URL)."""

    def __init__(self, uri: str, token: str = "") -> None:
        from pymilvus import DataType, MilvusClient

        self._types = DataType
        self.client = MilvusClient(uri, token=token)
        self._lock = threading.Lock()  # one writer at a time (read-modify-write of statuses)
        if not self.client.has_collection(CATALOGUE):
            schema = MilvusClient.create_schema(auto_id=False)
            schema.add_field("name", DataType.VARCHAR, is_primary=True, max_length=256)
            schema.add_field("spec", DataType.VARCHAR, max_length=4096)
            schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)  # a collection needs a vector
            index = self.client.prepare_index_params()
            index.add_index("unused", index_type="FLAT", metric_type="L2")
            self.client.create_collection(
                CATALOGUE, schema=schema, index_params=index, consistency_level="Strong"
            )

    # -- banks ---------------------------------------------------------------------------------

    def _spec(self, name: str) -> BankSpec | None:
        rows = self.client.get(CATALOGUE, ids=[name], output_fields=["spec"])
        return BankSpec(**json.loads(rows[0]["spec"])) if rows else None

    def _require(self, name: str) -> BankSpec:
        spec = self._spec(name)
        if spec is None:
            raise BankNotFound(name)
        return spec

    def create(self, spec: BankSpec) -> tuple[BankSpec, bool]:
        with self._lock:
            have = self._spec(spec.name)
            if have is not None:
                return have, False
            t = self._types
            schema = self.client.create_schema(auto_id=False)
            schema.add_field("id", t.VARCHAR, is_primary=True, max_length=256)
            schema.add_field("digest", t.VARCHAR, max_length=128)
            schema.add_field("size", t.INT64)
            schema.add_field("png", t.VARCHAR, max_length=PNG_CHARS)
            schema.add_field("vec", t.FLOAT_VECTOR, dim=spec.dim)
            index = self.client.prepare_index_params()
            index.add_index("vec", index_type="FLAT", metric_type="L2")
            coll = _collection(spec.name)
            if self.client.has_collection(coll):  # left over by a drop that did not finish
                self.client.drop_collection(coll)
            self.client.create_collection(
                coll, schema=schema, index_params=index, consistency_level="Strong"
            )
            row = {"name": spec.name, "spec": json.dumps(asdict(spec)), "unused": [0.0, 0.0]}
            self.client.insert(CATALOGUE, [row])
            return spec, True

    def info(self, name: str) -> BankInfo | None:
        spec = self._spec(name)
        if spec is None:
            return None
        rows = self._all(name, ["size"])
        return BankInfo(spec, len(rows), sum(int(r["size"]) for r in rows))

    def _all(self, name: str, fields: list[str]) -> list[dict[str, Any]]:
        """Every row's ``fields`` (pages of 1,000, up to Milvus's 16,384 offset + limit)."""
        out: list[dict[str, Any]] = []
        while len(out) % 1000 == 0 and len(out) < MAX_TOPK:
            page = self.client.query(
                _collection(name),
                filter='id != ""',
                output_fields=fields,
                limit=1000,
                offset=len(out),
            )
            out.extend(page)
            if not page:
                break
        return out

    def names(self) -> list[str]:
        rows = self.client.query(CATALOGUE, filter='name != ""', output_fields=["name"])
        return sorted(str(r["name"]) for r in rows)

    def drop(self, name: str) -> bool:
        with self._lock:
            if self._spec(name) is None:
                return False
            self.client.delete(CATALOGUE, ids=[name])
            self.client.drop_collection(_collection(name))
            return True

    # -- items ---------------------------------------------------------------------------------

    def upsert(self, name: str, items: Sequence[NewItem]) -> list[Added]:
        with self._lock:
            self._require(name)
            coll = _collection(name)
            ids = [it.id for it in items]
            old = {
                str(r["id"]): str(r["digest"])
                for r in self.client.get(coll, ids=ids, output_fields=["digest"])
            }
            statuses: list[Added] = []
            rows = []
            for it in items:
                if old.get(it.id) == it.digest:
                    statuses.append("unchanged")
                    continue
                text = base64.b64encode(it.png).decode("ascii")
                if len(text) > PNG_CHARS:
                    raise ValueError(
                        f"item {it.id!r}: its PNG ({len(it.png)} bytes) is over what this engine "
                        "stores per item; use a lower working resolution or the embedded storage"
                    )
                vec = np.asarray(it.embedding, dtype=np.float32)
                rows.append(
                    {
                        "id": it.id,
                        "digest": it.digest,
                        "size": int(vec.nbytes + len(it.png)),
                        "png": text,
                        "vec": vec.tolist(),
                    }
                )
                statuses.append("replaced" if it.id in old else "added")
            if rows:
                self.client.upsert(coll, rows)
            return statuses

    def remove(self, name: str, item_id: str) -> bool:
        with self._lock:
            self._require(name)
            coll = _collection(name)
            if not self.client.get(coll, ids=[item_id], output_fields=["id"]):
                return False
            self.client.delete(coll, ids=[item_id])
            return True

    # -- search --------------------------------------------------------------------------------

    def candidates(
        self, name: str, queries: Vectors, radius: float, limit: int
    ) -> tuple[int, list[tuple[str, float]]]:
        """As :meth:`SqliteFaissStorage.candidates`; the count saturates at :data:`MAX_TOPK`."""
        self._require(name)
        results = self.client.search(
            _collection(name),
            np.asarray(queries, dtype=np.float32).tolist(),
            limit=MAX_TOPK,
            output_fields=[],
            search_params={"metric_type": "L2", "params": {"radius": radius, "range_filter": 0.0}},
        )
        best: dict[str, float] = {}
        for hits in results:
            for h in hits:
                item, d = str(h["id"]), float(h["distance"])
                if d < best.get(item, np.inf):
                    best[item] = d
        ranked = sorted(best.items(), key=lambda kv: (kv[1], kv[0]))
        return len(ranked), ranked[:limit]

    def images(self, name: str, ids: Sequence[str]) -> dict[str, bytes]:
        if not ids:
            return {}
        rows = self.client.get(_collection(name), ids=list(ids), output_fields=["png"])
        return {str(r["id"]): base64.b64decode(r["png"]) for r in rows}

    def close(self) -> None:
        self.client.close()
