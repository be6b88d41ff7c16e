"""Prometheus metrics of the service, in an explicit registry per app (tests build several apps).

Names follow the design brief (section 6), plus the operational gauges of issue 14 (in-flight work,
readiness, draining, cache size, build info) and the distance histogram; the registry also holds the
``process_*`` and ``python_*`` collectors. :class:`Telemetry` also implements the batcher's
:class:`~app.batching.BatchObserver` and the engine's :class:`~app.engine.EngineObserver` hooks.
The full list, with meanings, is in the README ("Metrics").
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

# prometheus_client exports a ``<name>_created`` timestamp series beside every counter and histogram
# (and every label set of them): Prometheus does not use it, and it doubled the scrape. The switch is
# process-global (read when each metric is created), so it is flipped once, here, before any
# :class:`Telemetry` builds its metrics; the library's default registry is not used by the service.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: LPIPS distances are ≥ 0 and mostly below 1; the near-duplicate thresholds of the shipped models are
#: 0.20-0.54 (model_store/manifest.json, docs/CALIBRATION.md), so the buckets are 0.05 apart there.
DISTANCE_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 1.0, 1.5,
)  # fmt: skip
#: Every ``reason`` of ``rlpips_rejected_total`` (each ``rejected(...)`` call in app/; kept complete by
#: tests/unit/test_telemetry.py): exported at 0 from the start, so rates and alerts work before the
#: first rejection.
REJECT_REASONS = ("overloaded", "decode_full", "jobs_full", "deadline", "cancelled")


class CacheView(Protocol):
    """What the cache gauges read: the reference-feature cache (:class:`app.metric.engine.FeatureCache`)."""

    bytes: int

    def __len__(self) -> int: ...


class Telemetry:
    """Every metric of one app instance; ``render()`` gives the Prometheus text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, version: str = "0+unknown") -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.version = version
        ProcessCollector(registry=r)  # process_* (CPU, RSS, open fds, start time)
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*
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
        for reason in REJECT_REASONS:
            self.rejections.labels(reason=reason)
        self.pairs = Counter("rlpips_pairs", "image pairs scored", ["model"], registry=r)
        self.cache = Counter(
            "rlpips_cache_requests", "reference feature cache lookups", ["result"], registry=r
        )
        self.model_info = Gauge(
            "rlpips_model_info", "loaded models (value 1)", ["name", "trunk", "device"], registry=r
        )
        self._device_memory: Gauge | None = None
        self._gauges(r)
        self.distances = Histogram(
            "rlpips_distance",
            "distances returned by /distance, by model (to watch drift)",
            ["model"],
            buckets=DISTANCE_BUCKETS,
            registry=r,
        )

        self.bank_items = Gauge(
            "rlpips_bank_items", "items per known-items bank", ["bank"], registry=r
        )
        self.bank_searches = Counter(
            "rlpips_bank_searches", "bank searches answered, by bank", ["bank"], registry=r
        )
        self.bank_checked = Histogram(
            "rlpips_bank_checked",
            "items given the exact distance per bank search",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
            registry=r,
        )
        self.bank_search_duration = Histogram(
            "rlpips_bank_search_duration_seconds",
            "bank search latency (decode to answer)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def _gauges(self, r: CollectorRegistry) -> None:
        """The operational gauges; those that read the runtime give 0 until :meth:`watch_runtime`."""
        self.inflight_requests = Gauge(
            "rlpips_inflight_requests", "HTTP requests being handled", ["endpoint"], registry=r
        )
        self.inflight_pairs = Gauge(
            "rlpips_inflight_pairs",
            "pairs of /distance requests past admission and not yet answered "
            "(decoding, queued, on the device or being encoded)",
            registry=r,
        )
        self._ready: Callable[[], bool] = lambda: False
        self._draining: Callable[[], bool] = lambda: False
        self._attacks: Callable[[], int] = lambda: 0
        self._cache: CacheView | None = None
        Gauge(
            "rlpips_attacks_running", "robustness checks holding an attack slot", registry=r
        ).set_function(lambda: float(self._attacks()))
        Gauge("rlpips_ready", "1 when /readyz answers 200", registry=r).set_function(
            lambda: float(self._ready())
        )
        Gauge("rlpips_draining", "1 while shutting down", registry=r).set_function(
            lambda: float(self._draining())
        )
        Gauge("rlpips_cache_entries", "reference feature cache entries", registry=r).set_function(
            lambda: float(len(self._cache) if self._cache is not None else 0)
        )
        Gauge(
            "rlpips_cache_bytes", "reference feature cache size (tensor bytes)", registry=r
        ).set_function(lambda: float(self._cache.bytes if self._cache is not None else 0))
        self.build_info = Gauge(
            "rlpips_build_info",
            "the running build and its serving choices (value 1)",
            ["version", "python", "torch", "device", "precision", "default_model"],
            registry=r,
        )

    def watch_runtime(
        self,
        ready: Callable[[], bool],
        draining: Callable[[], bool],
        attacks: Callable[[], int],
        cache: CacheView,
    ) -> None:
        """Let the gauges read the serving runtime's state (read at each scrape, from any thread)."""
        self._ready, self._draining, self._attacks, self._cache = ready, draining, attacks, cache

    def runtime_info(self, device: str, precision: torch.dtype, default_model: str) -> None:
        """Set ``rlpips_build_info`` (one label set: the previous one is dropped)."""
        self.build_info.clear()
        self.build_info.labels(
            version=self.version,
            python=platform.python_version(),
            torch=torch.__version__,
            device=device,
            precision=str(precision).removeprefix("torch."),
            default_model=default_model,
        ).set(1)

    def declare_endpoints(self, endpoints: Collection[str]) -> None:
        """Export ``rlpips_inflight_requests`` at 0 for each of ``endpoints`` from the start."""
        for endpoint in endpoints:
            self.inflight_requests.labels(endpoint=endpoint)

    @contextmanager
    def request_inflight(self, endpoint: str) -> Iterator[None]:
        """Count one request of ``endpoint`` in ``rlpips_inflight_requests`` while the block runs."""
        gauge = self.inflight_requests.labels(endpoint=endpoint)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    @contextmanager
    def pairs_inflight(self, pairs: int) -> Iterator[None]:
        """Count ``pairs`` in ``rlpips_inflight_pairs`` while the block runs."""
        self.inflight_pairs.inc(pairs)
        try:
            yield
        finally:
            self.inflight_pairs.dec(pairs)

    def distances_returned(self, model: str, distances: Sequence[float]) -> None:
        hist = self.distances.labels(model=model)
        for d in distances:
            hist.observe(d)

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

    def bank_size(self, bank: str, items: int | None) -> None:
        """Set the items gauge of ``bank`` (``None``: the bank is gone, drop its series)."""
        if items is None:
            with contextlib.suppress(KeyError):
                self.bank_items.remove(bank)
        else:
            self.bank_items.labels(bank=bank).set(items)

    def bank_searched(self, bank: str, checked: int, seconds: float) -> None:
        self.bank_searches.labels(bank=bank).inc()
        self.bank_checked.observe(checked)
        self.bank_search_duration.observe(seconds)
