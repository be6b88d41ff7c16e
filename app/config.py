"""All settings in one place: environment variables with prefix ``RLPIPS_`` (pydantic-settings), and
the choices they imply (device, trunk precision). Imports nothing of the app but the model store and
the log format names."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.logs import LogFormat
from app.metric.store import DEFAULT_STORE, ModelStore

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def pick_device(name: Device | str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device. A CUDA device always has
    an index (``cuda:0`` for ``cuda``: ``torch.cuda.set_device`` refuses one without)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    return torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype:
    """The trunk's compute dtype: ``auto`` → float16 on CUDA, float32 elsewhere; else the named one.

    float32 on CPU: bfloat16 autocast ran ×1.3–1.6 faster on the benchmark CPU (AVX512-BF16) but
    misses the 1e-3 parity bar (lpips-squeeze golden pairs 1.6e-3, lpips-alex ImageNet pairs at 64²
    1.2e-3); float16 autocast ran ×0.2–0.3 of float32 on that CPU (docs/benchmarks/optim.json,
    tests/unit/test_precision.py).
    """
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[precision]


def comma_list(values: str | Iterable[str] | None, keep_empty: bool = False) -> list[str]:
    """``"a, b"``, ``["a,b", "c"]`` → ``["a", "b", "c"]``: split on commas, stripped, repeats dropped,
    order kept (model lists, API keys). Empty parts are dropped, or kept with ``keep_empty`` (an API
    request naming an empty model is an error, not a default)."""
    items = [values] if isinstance(values, str) else list(values or [])
    parts = (p.strip() for v in items for p in v.split(","))
    return list(dict.fromkeys(p for p in parts if p or keep_empty))


class Settings(BaseSettings):
    """Service and CLI settings; every field can be set as ``RLPIPS_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="RLPIPS_", extra="ignore")

    device: Device = "auto"
    resolution: int = Field(256, ge=16, le=1024, description="working resolution (square side)")
    max_batch_pairs: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="extra wait for a batch to fill; 0: run as soon as the device is free",
    )
    queue_size: int = Field(256, ge=1, description="admission queue bound, in pairs")
    deadline_s: float = Field(10.0, gt=0, description="per-request deadline")
    attack_deadline_s: float = Field(
        60.0, gt=0, description="per-request deadline of /robustness-check"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must arrive within this (else 408, closed)"
    )
    body_idle_timeout_s: float = Field(
        10.0, gt=0, description="longest pause between chunks of a request body (else 408)"
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="a whole request body must arrive within this (else 408)"
    )
    keepalive_timeout_s: float = Field(
        75.0,
        gt=0,
        description="an idle connection is closed after this (above the usual 60 s of load "
        "balancers, so they never reuse a connection the service is closing)",
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1, description="per-image decoded pixel limit")
    max_request_pixels: int = Field(
        100_000_000,
        ge=1,
        description="decode cost of one request's images together, in pixel units (rows and JPEG "
        "scans charged); over it 413 before decoding",
    )
    max_jpeg_scans: int = Field(64, ge=1, description="scans per JPEG (progressive scan bombs)")
    decode_heavy_pixels: int = Field(
        4_000_000,
        ge=1,
        description="images costing more decode one at a time on a low-priority thread",
    )
    decode_queue_pixels: int = Field(
        200_000_000,
        ge=1,
        description="decode cost queued or running per lane (normal, heavy); beyond it 429",
    )
    max_candidates: int = Field(32, ge=1)
    decode_threads: int = Field(0, ge=0, description="decode + resize threads; 0 = two per core")
    jpeg_draft: bool = Field(
        False,
        description="opt-in: decode JPEGs at a reduced DCT scale (faster; moves distances up to 0.027)",
    )
    decode_device: Literal["cpu", "device"] = Field(
        "cpu",
        description="opt-in: 'device' decodes /distance's JPEGs on the model's device in one batched "
        "call per micro-batch (nvJPEG on CUDA) instead of Pillow on the CPU; moves LPIPS-alex "
        "distances by up to 2e-3 (docs/BENCHMARKS.md)",
    )
    torch_threads: int = Field(0, ge=0, description="intra-op threads; 0 = torch default")
    precision: Precision = Field(
        "auto",
        description="trunk compute dtype for distances (autocast); auto = fp16 on CUDA, fp32 on CPU",
    )
    channels_last: bool = Field(
        True, description="trunk weights and input batches in channels-last memory format"
    )
    cpu_streams: int = Field(
        0, ge=0, description="CPU: concurrent chunks per trunk pass; 0 = one per core, 1 = off"
    )
    cache_entries: int = Field(1024, ge=0, description="reference feature cache size")
    cache_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="reference feature cache bound in bytes"
    )
    model_store: Path = DEFAULT_STORE
    weights_dir: Path | None = None
    cache_dir: Path | None = None
    default_model: str | None = None
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    max_attack_steps: int = Field(100, ge=1)
    max_attack_epsilon: float = Field(16 / 255, gt=0, le=1)
    max_attack_epsilon_l2: float = Field(4.0, gt=0, description="L2 ε cap, [0, 1] pixel units")
    max_attack_jobs: int = Field(2, ge=1)
    open_probes: bool = Field(True, description="/healthz, /readyz, /metrics need no API key")
    open_pages: bool = Field(
        True,
        description="/, /ui, /docs and their static assets need no API key (they hold no data)",
    )
    data_dir: Path = Field(
        Path("data"),
        description="where the known-items banks live (SQLite file banks.sqlite3); relative paths "
        "are taken from the working directory",
    )
    bank_engine: Literal["embedded", "milvus"] = Field(
        "embedded",
        description="bank storage: embedded (SQLite + FAISS in data_dir) or milvus (pymilvus)",
    )
    bank_milvus_uri: str = Field(
        "", description="Milvus server URL, or a milvus-lite file; empty: data_dir/milvus.db"
    )
    bank_refresh_s: float = Field(
        1.0,
        ge=0,
        description="replicas sharing data_dir: apply the others' bank changes this often "
        "(the staleness bound of a search on another replica); 0 = never",
    )
    bank_embedding: Literal["projected", "cells"] = Field(
        "projected",
        description="new banks' lower-bound embedding: the model's fitted projection of mean-and-"
        "spread statistics where the store has one (docs/BANK.md), else cell means at bank_grid",
    )
    bank_grid: int = Field(
        1, ge=1, le=8, description="grid of the cell-means embedding (cells per side)"
    )
    bank_max_items: int = Field(32, ge=1, description="items per POST /banks/{bank}/items")
    bank_max_checked: int = Field(
        24,
        ge=1,
        description="default cap on items whose exact distance one search computes (lowest "
        "lower bounds first); a search over more survivors says complete=false",
    )
    max_batch_failures: int = Field(
        3, ge=1, description="consecutive failed device batches before /readyz turns 503"
    )
    grace_s: float = Field(30.0, gt=0, description="shutdown bound, SIGTERM to exit (seconds)")
    drain_s: float = Field(
        10.0,
        ge=0,
        description="after SIGTERM, answer 503 draining this long before closing (at least one "
        "load balancer probe interval, so the LB sees the failing /readyz and stops routing here)",
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7",
        description="peers (IPs or CIDR networks, comma-separated; * for any) whose X-Forwarded-For "
        "and X-Forwarded-Proto are trusted: loopback and the private networks load balancers, "
        "compose and Kubernetes use; a client on a public address cannot set them",
    )
    root_path: str = Field(
        "", description="ASGI root path when a proxy serves the API under a path prefix"
    )
    log_format: LogFormat = Field(
        "text", description="log lines as text or one JSON object per line (with request_id)"
    )

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return comma_list(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _drain_within_grace(self) -> Settings:
        if self.drain_s >= self.grace_s:
            raise ValueError(
                f"drain_s ({self.drain_s}) must be shorter than grace_s ({self.grace_s})"
            )
        return self

    def store(self) -> ModelStore:
        """The model store these settings describe."""
        return ModelStore(self.model_store, weights_dir=self.weights_dir, cache_dir=self.cache_dir)
