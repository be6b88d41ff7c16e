"""Durable bank storage: SQLite rows (banks, items, embeddings, item images) + in-memory FAISS indexes.

One SQLite file ``<data_dir>/banks.sqlite3`` in WAL mode with ``synchronous=FULL``: every change is
one transaction, committed before it is acknowledged, so a killed process loses nothing it answered
for. Each bank's embeddings live in an in-memory FAISS ``IndexIDMap2(IndexFlatL2)`` keyed by the item's
row number, rebuilt from SQLite when the store opens; the index is changed only after the commit and
under a lock (searches take the same lock only for the range search itself, so an insert never waits
for a search's exact stage, and readers on their own SQLite connections never wait for writers).

Per item: the embedding (``4·D`` bytes; D = 256 with the default model's projection, 1,152 for
AlexNet cell means at grid 1) and the item as the service
decoded and resized it, as a lossless 8-bit PNG (the exact stage re-runs the trunk on it: bit-equal
input to what ``/distance`` computes from the original upload).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from app.bank.base import Added, BankInfo, BankNotFound, BankSpec, BankStorage, NewItem, Vectors
from app.bank.index import LiveBank, add_vectors, new_index, remove_ids

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS banks (
    name TEXT PRIMARY KEY, model TEXT NOT NULL, threshold REAL NOT NULL, grid INTEGER NOT NULL,
    resolution INTEGER NOT NULL, dim INTEGER NOT NULL, created REAL NOT NULL,
    embedding TEXT NOT NULL DEFAULT 'cells');
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, bank TEXT NOT NULL, id TEXT NOT NULL,
    digest TEXT NOT NULL, embedding BLOB NOT NULL, added REAL NOT NULL, UNIQUE (bank, id));
CREATE TABLE IF NOT EXISTS images (seq INTEGER PRIMARY KEY, png BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    n INTEGER PRIMARY KEY AUTOINCREMENT, bank TEXT NOT NULL, seq INTEGER, kind TEXT NOT NULL);
"""


class SqliteFaissStorage:
    """The embedded default (see the module docstring); thread-safe."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "banks.sqlite3"
        self._local = threading.local()
        self._write = threading.Lock()  # one writer: SQLite transaction + index update
        self._index_lock = threading.Lock()  # FAISS indexes and the live maps
        self._conns: list[sqlite3.Connection] = []
        self._db().executescript(SCHEMA)
        _migrate(self._db())
        t0 = time.perf_counter()
        (cursor,) = self._db().execute("SELECT coalesce(max(n), 0) FROM changes").fetchone()
        self._cursor = int(cursor)  # the change log read so far (replicas: :meth:`refresh`)
        self._live: dict[str, LiveBank] = {}
        for spec in self._specs():
            self._live[spec.name] = self._load(spec)
        log.info(
            "bank storage %s: %d banks, %d items, indexes rebuilt in %.2f s",
            self.path,
            len(self._live),
            sum(len(b.ids) for b in self._live.values()),
            time.perf_counter() - t0,
        )

    # -- connections ---------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (WAL: readers never wait for the writer)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=10000")
            self._local.db = db
            self._conns.append(db)
        return db

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        """A transaction on this thread's connection: committed on success, rolled back on error."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        for db in self._conns:
            db.close()
        self._conns.clear()
        self._local = threading.local()

    # -- loading -------------------------------------------------------------------------------

    def _specs(self) -> list[BankSpec]:
        rows = self._db().execute(
            "SELECT name, model, threshold, grid, resolution, dim, embedding FROM banks ORDER BY name"
        )
        return [BankSpec(*r) for r in rows]

    def _load(self, spec: BankSpec) -> LiveBank:
        """The bank's index rebuilt from its rows."""
        live = LiveBank(spec, new_index(spec.dim), {}, {}, 0)
        rows = self._db().execute(
            "SELECT i.seq, i.id, i.embedding, length(m.png) FROM items i JOIN images m "
            "ON m.seq = i.seq WHERE i.bank = ? ORDER BY i.seq",
            (spec.name,),
        )
        seqs: list[int] = []
        vecs: list[bytes] = []
        for seq, item_id, emb, size in rows:
            seqs.append(seq)
            vecs.append(emb)
            live.ids[seq] = item_id
            live.seq_of[item_id] = seq
            live.bytes += len(emb) + size
            live.sizes[seq] = len(emb) + size
            if len(vecs) >= 4096:
                add_vectors(live.index, seqs, vecs, spec.dim)
                seqs, vecs = [], []
        if vecs:
            add_vectors(live.index, seqs, vecs, spec.dim)
        return live

    def _bank(self, name: str) -> LiveBank:
        live = self._live.get(name)
        if live is None:
            raise BankNotFound(name)
        return live

    # -- banks ---------------------------------------------------------------------------------

    def create(self, spec: BankSpec) -> tuple[BankSpec, bool]:
        """``(the bank's spec, created)``: a bank that exists keeps its own spec (the caller compares)."""
        with self._write:
            live = self._live.get(spec.name)
            if live is not None:
                return live.spec, False
            with self._conn() as db:
                db.execute(
                    "INSERT INTO banks (name, model, threshold, grid, resolution, dim, created, "
                    "embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        spec.name,
                        spec.model,
                        spec.threshold,
                        spec.grid,
                        spec.resolution,
                        spec.dim,
                        time.time(),
                        spec.embedding,
                    ),
                )
                _log(db, spec.name, None, "create")
            with self._index_lock:
                self._live[spec.name] = LiveBank(spec, new_index(spec.dim), {}, {}, 0)
            return spec, True

    def info(self, name: str) -> BankInfo | None:
        with self._index_lock:
            live = self._live.get(name)
            return None if live is None else BankInfo(live.spec, len(live.ids), live.bytes)

    def names(self) -> list[str]:
        with self._index_lock:
            return sorted(self._live)

    def drop(self, name: str) -> bool:
        with self._write:
            if name not in self._live:
                return False
            with self._conn() as db:
                db.execute(
                    "DELETE FROM images WHERE seq IN (SELECT seq FROM items WHERE bank = ?)",
                    (name,),
                )
                db.execute("DELETE FROM items WHERE bank = ?", (name,))
                db.execute("DELETE FROM banks WHERE name = ?", (name,))
                _log(db, name, None, "drop")
            with self._index_lock:
                del self._live[name]
            return True

    # -- items ---------------------------------------------------------------------------------

    def upsert(self, name: str, items: Sequence[NewItem]) -> list[Added]:
        """Store ``items`` in one transaction (idempotent per id: the same content is ``unchanged``,
        other content under a known id ``replaced``); acknowledged once committed."""
        with self._write:
            live = self._bank(name)
            statuses: list[Added] = []
            removed: list[int] = []
            added: list[tuple[int, NewItem]] = []
            delta = 0
            with self._conn() as db:
                for item in items:
                    old = db.execute(
                        "SELECT seq, digest, length(embedding) FROM items WHERE bank = ? AND id = ?",
                        (name, item.id),
                    ).fetchone()
                    if old is not None and old[1] == item.digest:
                        statuses.append("unchanged")
                        continue
                    if old is not None:
                        (size,) = db.execute(
                            "SELECT length(png) FROM images WHERE seq = ?", (old[0],)
                        ).fetchone()
                        db.execute("DELETE FROM items WHERE seq = ?", (old[0],))
                        db.execute("DELETE FROM images WHERE seq = ?", (old[0],))
                        removed.append(old[0])
                        _log(db, name, old[0], "del")
                        delta -= old[2] + size
                    emb = np.ascontiguousarray(item.embedding, dtype=np.float32).tobytes()
                    cur = db.execute(
                        "INSERT INTO items (bank, id, digest, embedding, added) VALUES (?, ?, ?, ?, ?)",
                        (name, item.id, item.digest, emb, time.time()),
                    )
                    seq = int(cur.lastrowid or 0)
                    db.execute("INSERT INTO images VALUES (?, ?)", (seq, item.png))
                    added.append((seq, item))
                    _log(db, name, seq, "add")
                    delta += len(emb) + len(item.png)
                    statuses.append("replaced" if old is not None else "added")
            with self._index_lock:
                if removed:
                    remove_ids(live.index, removed)
                    for seq in removed:
                        live.seq_of.pop(live.ids.pop(seq), None)
                        live.sizes.pop(seq, None)
                if added:
                    vecs = np.stack([it.embedding for _, it in added]).astype(np.float32)
                    live.index.add_with_ids(vecs, np.asarray([s for s, _ in added], np.int64))
                    for seq, it in added:
                        live.ids[seq] = it.id
                        live.seq_of[it.id] = seq
                        live.sizes[seq] = 4 * live.spec.dim + len(it.png)
                live.bytes += delta
            return statuses

    def remove(self, name: str, item_id: str) -> bool:
        with self._write:
            live = self._bank(name)
            seq = live.seq_of.get(item_id)
            if seq is None:
                return False
            with self._conn() as db:
                (size,) = db.execute(
                    "SELECT length(embedding) + (SELECT length(png) FROM images WHERE seq = ?) "
                    "FROM items WHERE seq = ?",
                    (seq, seq),
                ).fetchone()
                db.execute("DELETE FROM items WHERE seq = ?", (seq,))
                db.execute("DELETE FROM images WHERE seq = ?", (seq,))
                _log(db, name, seq, "del")
            with self._index_lock:
                remove_ids(live.index, [seq])
                del live.ids[seq]
                del live.seq_of[item_id]
                live.bytes -= size
                live.sizes.pop(seq, None)
            return True

    # -- replicas ------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Apply the changes other processes made to the shared SQLite file since the last call (the
        change log ``changes``, written in each change's transaction) to this process's indexes;
        returns how many were read. Idempotent: a change already applied is skipped."""
        with self._write:
            rows = (
                self._db()
                .execute(
                    "SELECT n, bank, seq, kind FROM changes WHERE n > ? ORDER BY n", (self._cursor,)
                )
                .fetchall()
            )
            for n, bank, seq, kind in rows:
                self._apply(bank, seq, kind)
                self._cursor = n
            return len(rows)

    def _apply(self, bank: str, seq: int | None, kind: str) -> None:
        live = self._live.get(bank)
        if kind == "create" and live is None:
            spec = next((s for s in self._specs() if s.name == bank), None)
            if spec is not None:
                loaded = self._load(spec)
                with self._index_lock:
                    self._live[bank] = loaded
        elif kind == "drop" and live is not None:
            with self._index_lock:
                del self._live[bank]
        elif kind == "del" and live is not None and seq in live.ids:
            with self._index_lock:
                remove_ids(live.index, [seq])
                live.seq_of.pop(live.ids.pop(seq), None)
                live.bytes -= live.sizes.pop(seq, 0)
        elif kind == "add" and live is not None and seq not in live.ids:
            row = (
                self._db()
                .execute(
                    "SELECT i.id, i.embedding, length(m.png) FROM items i JOIN images m "
                    "ON m.seq = i.seq WHERE i.seq = ?",
                    (seq,),
                )
                .fetchone()
            )
            if row is not None and seq is not None:  # None: deleted again since
                with self._index_lock:
                    add_vectors(live.index, [seq], [row[1]], live.spec.dim)
                    live.ids[seq] = row[0]
                    live.seq_of[row[0]] = seq
                    live.bytes += len(row[1]) + row[2]
                    live.sizes[seq] = len(row[1]) + row[2]

    # -- search --------------------------------------------------------------------------------

    def candidates(
        self, name: str, queries: Vectors, radius: float, limit: int
    ) -> tuple[int, list[tuple[str, float]]]:
        """``(n, best)``: the number ``n`` of items within squared L2 ``radius`` of a row of
        ``queries`` ``[Q, D]``, and the ``limit`` of them with the smallest such distance (their lower
        bound), as ``(item id, bound)`` in increasing bound."""
        with self._index_lock:
            live = self._bank(name)
            if live.index.ntotal == 0:
                return 0, []
            _, dist, labels = live.index.range_search(np.ascontiguousarray(queries), radius)
            order = np.argsort(dist, kind="stable")
            if len(queries) == 1:
                top = order[:limit]
                return len(labels), [(live.ids[int(labels[i])], float(dist[i])) for i in top]
            best: dict[str, float] = {}
            for i in order:  # increasing bound: the first time an item appears is its best
                item = live.ids[int(labels[i])]
                if item not in best:
                    best[item] = float(dist[i])
                    if len(best) == limit:
                        break
            return len(np.unique(labels)), list(best.items())

    def vectors(self, name: str) -> tuple[list[str], Vectors]:
        """Every item id and its embedding (tests, brute force)."""
        rows = (
            self._db()
            .execute("SELECT id, embedding FROM items WHERE bank = ? ORDER BY seq", (name,))
            .fetchall()
        )
        dim = self._bank(name).spec.dim
        vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(-1, dim)
        return [r[0] for r in rows], vecs

    def images(self, name: str, ids: Sequence[str]) -> dict[str, bytes]:
        """The stored PNG of each of ``ids`` that is still in the bank."""
        out: dict[str, bytes] = {}
        db = self._db()
        for i in range(0, len(ids), 500):
            chunk = list(ids[i : i + 500])
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT i.id, m.png FROM items i JOIN images m ON m.seq = i.seq "
                f"WHERE i.bank = ? AND i.id IN ({marks})",
                (name, *chunk),
            )
            out.update({r[0]: r[1] for r in rows})
        return out


def _migrate(db: sqlite3.Connection) -> None:
    """Files written before banks had an ``embedding`` column: their banks are ``cells`` banks."""
    if "embedding" not in {r[1] for r in db.execute("PRAGMA table_info(banks)")}:
        db.execute("ALTER TABLE banks ADD COLUMN embedding TEXT NOT NULL DEFAULT 'cells'")
        db.commit()


def _log(db: sqlite3.Connection, bank: str, seq: int | None, kind: str) -> None:
    db.execute("INSERT INTO changes (bank, seq, kind) VALUES (?, ?, ?)", (bank, seq, kind))


def open_storage(engine: str, data_dir: Path, milvus_uri: str = "") -> BankStorage:
    """The configured engine: ``embedded`` (SQLite + FAISS in ``data_dir``) or ``milvus`` (at
    ``milvus_uri``; empty: a milvus-lite file ``data_dir/milvus.db``)."""
    if engine == "milvus":
        from app.bank.milvus import MilvusStorage

        data_dir.mkdir(parents=True, exist_ok=True)
        return MilvusStorage(milvus_uri or str(data_dir / "milvus.db"))
    return SqliteFaissStorage(data_dir)
