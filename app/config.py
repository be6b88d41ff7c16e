"""All settings in one place: environment variables with prefix ``RLPIPS_`` (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.engine import Precision
from app.metric.store import DEFAULT_STORE, ModelStore


class Settings(BaseSettings):
    """Service and CLI settings; every field can be set as ``RLPIPS_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="RLPIPS_", extra="ignore")

    device: Literal["auto", "cpu", "cuda"] = "auto"
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
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1, description="per-image decoded pixel limit")
    max_candidates: int = Field(32, ge=1)
    decode_threads: int = Field(0, ge=0, description="decode + resize threads; 0 = two per core")
    jpeg_draft: bool = Field(
        False,
        description="opt-in: decode JPEGs at a reduced DCT scale (faster; moves distances up to 0.027)",
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
    max_batch_failures: int = Field(
        3, ge=1, description="consecutive failed device batches before /readyz turns 503"
    )
    grace_s: float = Field(30.0, gt=0, description="shutdown bound, SIGTERM to exit (seconds)")
    drain_s: float = Field(
        2.0, ge=0, description="after SIGTERM, answer 503 draining this long before closing"
    )

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

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
