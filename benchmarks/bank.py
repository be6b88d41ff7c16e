"""The known-items bank through the service (in process, over ASGI, the real pipeline): ingestion
rate, search latency at growing bank sizes, memory and disk per item.

1. Ingest ``--ingest`` ImageNet images (``POST /banks/kb/items``, ``--batch`` per request, two
   concurrent clients) → images/s and the stored bytes per item (embedding + PNG, SQLite file size).
2. Search latency (``POST /banks/kb/search``, one at a time, ``--searches`` JPEG-q50 copies of bank
   images) at that size, then after filling the bank to each of ``--sizes`` with synthetic items
   written straight to the storage: embeddings mixed from two real ones (``λ·e_a + (1−λ)·e_b``), each
   with the stored PNG of a real ingested image that is not the source of any query (so the exact
   stage decodes and prunes a natural image, as it would in a real bank), made distinct by a text
   chunk with the item's number (same pixels, its own content key). Recall is *not* measured on this
   fill (see ``benchmarks/bank_metric.py``).
3. Resident memory per filled item (VmRSS delta / items).

    nice -n 5 python -m benchmarks.bank --ingest 256 --searches 40 --sizes 10000,100000 \
        --max-checked 8,16,32,48 --out docs/benchmarks/bank.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import shutil
import statistics
import struct
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
from asgi_lifespan import LifespanManager
from PIL import Image

from app.bank.base import NewItem
from app.bank.storage import SqliteFaissStorage
from app.config import Settings
from app.main import create_app
from benchmarks.loadgen import IMAGENET

log = logging.getLogger("benchmarks.bank")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _jpeg(data: bytes, quality: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def _ingest(client: httpx.AsyncClient, images: list[bytes], batch: int) -> float:
    """Images per second over two concurrent clients."""
    chunks = [list(range(s, min(s + batch, len(images)))) for s in range(0, len(images), batch)]

    async def worker(mine: list[list[int]]) -> None:
        for chunk in mine:
            body = {"items": [{"id": f"img{k}", "image": _b64(images[k])} for k in chunk]}
            r = await client.post("/banks/kb/items", json=body)
            r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(worker(chunks[0::2]), worker(chunks[1::2]))
    return len(images) / (time.perf_counter() - t0)


async def _search(
    client: httpx.AsyncClient, queries: list[bytes], max_checked: int
) -> dict[str, object]:
    lat, checked, cands, stages = [], [], [], []
    for q in queries:
        t0 = time.perf_counter()
        r = await client.post(
            "/banks/kb/search", json={"image": _b64(q), "max_checked": max_checked}
        )
        lat.append((time.perf_counter() - t0) * 1e3)
        r.raise_for_status()
        body = r.json()
        checked.append(body["checked"])
        cands.append(body["candidates"])
        stages.append(body["timing_ms"])
    lat.sort()
    return {
        "searches": len(lat),
        "max_checked": max_checked,
        "p50_ms": round(statistics.median(lat), 1),
        "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
        "candidates_median": statistics.median(cands),
        "checked_median": statistics.median(checked),
        "stage_ms_median": {
            k: round(statistics.median(s[k] for s in stages), 1) for k in stages[0]
        },
    }


def _tagged(png: bytes, k: int) -> bytes:
    """``png`` with a ``tEXt`` chunk ``fill=k`` after its header: the same pixels, other bytes."""
    data = b"fill\x00" + str(k).encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + data) & 0xFFFFFFFF)
    return png[:33] + chunk + png[33:]  # signature (8) + IHDR (25)


def _fill(
    storage: SqliteFaissStorage, target: int, rng: np.random.Generator, pngs: list[bytes]
) -> None:
    """Synthetic items up to ``target``: mixtures of two real embeddings, a real PNG each."""
    ids, vecs = storage.vectors("kb")
    real = vecs[[k for k, i in enumerate(ids) if i.startswith("img")]]  # not earlier fills
    have = storage.info("kb")
    assert have is not None
    n = target - have.items
    for s in range(0, n, 2000):
        k = min(2000, n - s)
        a, b = rng.integers(0, len(real), k), rng.integers(0, len(real), k)
        lam = rng.uniform(0.2, 0.8, (k, 1)).astype(np.float32)
        vecs = lam * real[a] + (1 - lam) * real[b]
        items = [
            NewItem(
                f"fill{have.items + s + j}",
                f"fill{have.items + s + j}",
                vecs[j],
                _tagged(pngs[(s + j) % len(pngs)], have.items + s + j),
            )
            for j in range(k)
        ]
        storage.upsert("kb", items)


async def run(args: argparse.Namespace) -> dict[str, object]:
    data = Path(tempfile.mkdtemp(prefix="rlpips-bank-bench-"))
    settings = Settings(resolution=args.resolution, data_dir=data)
    app = create_app(settings)
    files = sorted(IMAGENET.glob("*.JPEG"))
    images = [f.read_bytes() for f in files[: args.ingest]]
    queries = [_jpeg(images[k], 50) for k in range(min(args.searches, len(images)))]
    report: dict[str, object] = {"resolution": args.resolution, "data_dir": str(data)}
    async with LifespanManager(app, startup_timeout=300, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b", timeout=600) as c:
            (await c.put("/banks/kb")).raise_for_status()
            report["ingest_images_per_s"] = round(await _ingest(c, images, args.batch), 1)
            info = (await c.get("/banks/kb")).json()
            report["ingested"] = info["items"]
            report["stored_bytes_per_item"] = info["bytes"] // max(1, info["items"])
            files = sum(f.stat().st_size for f in data.glob("banks.sqlite3*"))
            report["sqlite_file_bytes_per_item"] = files // max(1, info["items"])
            report["embedding_dimension"] = info["dimension"]
            report["model"] = info["model"]
            storage = app.state.banks.storage
            assert isinstance(storage, SqliteFaissStorage)
            rng = np.random.default_rng(0)
            sources = [f"img{k}" for k in range(len(queries), len(images))]  # no query's source
            pngs = list((await asyncio.to_thread(storage.images, "kb", sources)).values())
            sizes: dict[str, object] = {}
            for k in args.max_checked:
                sizes[f"{info['items']}@{k}"] = await _search(c, queries, k)
            for size in args.sizes:
                rss0, t0 = _rss_mb(), time.perf_counter()
                before = storage.info("kb")
                assert before is not None
                await asyncio.to_thread(_fill, storage, size, rng, pngs)
                fill_s = time.perf_counter() - t0
                added = size - before.items
                entry: dict[str, object] = {
                    "fill_s": round(fill_s, 1),
                    "rss_bytes_per_item": round((_rss_mb() - rss0) * 2**20 / max(1, added)),
                }
                for k in args.max_checked:
                    entry[f"max_checked={k}"] = await _search(c, queries, k)
                sizes[str(size)] = entry
            report["search"] = sizes
    report["load_average"] = os.getloadavg()
    shutil.rmtree(data, ignore_errors=True)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--ingest", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--searches", type=int, default=50)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--max-checked", default="4,16")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    args.sizes = [int(v) for v in args.sizes.split(",") if v]
    args.max_checked = [int(v) for v in args.max_checked.split(",") if v]
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
