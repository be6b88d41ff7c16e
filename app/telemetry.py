"""Prometheus metrics of the service, in an explicit registry per app (tests build several apps).

Names follow the design brief (section 6). :class:`Telemetry` also implements the batcher's
:class:`~app.batching.BatchObserver` and the engine's :class:`~app.engine.EngineObserver` hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Telemetry:
    """Every metric of one app instance; ``render()`` gives the Prometheus text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "rlpips_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "rlpips_request_duration_seconds",
            "HTTP request duration",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth_gauge = Gauge(
            "rlpips_queue_depth", "pairs admitted and waiting for the device", registry=r
        )
        self.queue_wait = Histogram(
            "rlpips_queue_wait_seconds",
            "time from admission to the device",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rlpips_batch_size", "pairs per device batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "rlpips_inference_duration_seconds",
            "device time per distance batch or attack step",
            ["kind"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            "rlpips_decode_duration_seconds",
            "decode + resize time per image",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "rlpips_rejected", "work refused or dropped, by reason", ["reason"], registry=r
        )
        self.pairs = Counter("rlpips_pairs", "image pairs scored", ["model"], registry=r)
        self.cache = Counter(
            "rlpips_cache_requests", "reference feature cache lookups", ["result"], registry=r
        )
        self.model_info = Gauge(
            "rlpips_model_info", "loaded models (value 1)", ["name", "trunk", "device"], registry=r
        )
        self._device_memory: Gauge | None = None

    def watch_device(self, device: torch.device) -> None:
        """Export ``rlpips_device_memory_bytes`` (allocated) for a CUDA device; no-op on CPU."""
        if device.type != "cuda" or self._device_memory is not None:
            return
        self._device_memory = Gauge(
            "rlpips_device_memory_bytes", "memory allocated on the device", registry=self.registry
        )
        self._device_memory.set_function(lambda: float(torch.cuda.memory_allocated(device)))

    def model_loaded(self, name: str, trunk: str, device: str) -> None:
        self.model_info.labels(name=name, trunk=trunk, device=device).set(1)

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.request_duration.labels(endpoint=endpoint).observe(seconds)

    def decoded(self, seconds: float) -> None:
        self.decode.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- BatchObserver -------------------------------------------------------------------------

    def queue_depth(self, size: int) -> None:
        self.queue_depth_gauge.set(size)

    def batch_done(self, size: int, waits_s: Sequence[float], device_s: float) -> None:
        self.batch_size.observe(size)
        self.inference.labels(kind="distance").observe(device_s)
        for w in waits_s:
            self.queue_wait.observe(w)

    def step_done(self, device_s: float) -> None:
        self.inference.labels(kind="attack").observe(device_s)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    # -- EngineObserver ------------------------------------------------------------------------

    def cache_lookup(self, hit: bool) -> None:
        self.cache.labels(result="hit" if hit else "miss").inc()

    def pairs_done(self, model: str, pairs: int) -> None:
        self.pairs.labels(model=model).inc(pairs)
