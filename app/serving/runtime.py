"""The serving runtime of one app: engine, device worker, micro-batcher, job runner and decode pool.

Section 4 of the design brief, without HTTP. Created and started by the app's lifespan
(:mod:`app.main`); the routes reach it through a dependency (:mod:`app.api.deps`) and call, in order,
``check_*`` (refuse before costly work), :meth:`Runtime.decode` (thread pool), then
:meth:`Runtime.distance` (micro-batched on the device worker) or :meth:`Runtime.attack` (a step job
that is built and run entirely on the device thread).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Generator, Sequence
from functools import partial
from typing import TypeVar

import torch
from torch import Tensor

from app import device_decode
from app.attacks.robustness import AttackSpec, ModelResult, RobustnessJob, Target
from app.config import Settings, pick_device, resolve_precision
from app.imaging import (
    DecodeLimits,
    Header,
    ImageError,
    ImageTooLarge,
    inspect,
    load_tensor,
    to_unit,
)
from app.metric.engine import Engine, FeatureCache
from app.metric.queries import Answer, Image, Invariance, Query, content_key
from app.metric.store import BASELINE_MODEL, ModelStore
from app.serving.batching import Completed, MicroBatcher
from app.serving.decoding import DecodeScheduler
from app.serving.errors import DeadlineExceeded, Overloaded
from app.serving.worker import DeviceWorker, JobRunner
from app.telemetry import Telemetry

log = logging.getLogger(__name__)
R = TypeVar("R")

#: Seconds between readiness probes of a failing device.
PROBE_EVERY_S = 5.0
#: Longest wait for the batcher and for the device worker each when stopping.
STOP_WAIT_S = 2.0


def configured_models(settings: Settings, store: ModelStore) -> tuple[str, list[str]]:
    """``(default model, models to load)``: ``settings.models`` or ``[default, lpips-alex]``, with the
    default always included, deduplicated. Raises ``KeyError`` for a name the store does not know."""
    default = settings.default_model or store.manifest.default
    names = list(dict.fromkeys([default, *(settings.models or [BASELINE_MODEL])]))
    for name in names:
        store.model(name)
    return default, names


def is_out_of_memory(exc: BaseException) -> bool:
    """The batcher's ``split_on``: device out of memory; frees cached blocks so a half batch can fit."""
    if not isinstance(exc, torch.OutOfMemoryError):
        return False
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


def cpu_threads(settings: Settings, device: torch.device) -> tuple[int, int]:
    """``(streams, intra-op threads)`` for the engine; intra-op ``0`` keeps torch's default.

    On CPU the default is one single-threaded stream per core: measured on the shared 2-core machine,
    multi-threaded kernels stall whenever decoding or other processes take a core (docs/BENCHMARKS.md).
    On CUDA one intra-op thread: with torch's default (one per core) every decode thread's small tensor
    work started a full OpenMP pool, and the H200 machine served 100-160 pairs/s (docs/BENCHMARKS.md).
    """
    if device.type != "cpu":
        # the device does the maths; the CPU's tensor work is small, on many decode threads
        return 1, settings.torch_threads or 1
    streams = settings.cpu_streams or len(os.sched_getaffinity(0))
    return streams, settings.torch_threads or (1 if streams > 1 else 0)


def decode_threads(settings: Settings) -> int:
    """Decode + resize threads: the setting, or two per core (``0``). Pillow releases the GIL while
    decoding and resizing; on the 2-core benchmark machine 4 threads beat 2 by 12 % at 64² (c=32) and
    matched them at 256² (docs/BENCHMARKS.md)."""
    return settings.decode_threads or 2 * len(os.sched_getaffinity(0))


def _attack_job(
    engine: Engine,
    reference: Image,
    candidate: Image | None,
    thresholds: dict[str, float],
    spec: AttackSpec,
    mirror: bool,
) -> Generator[None, None, list[ModelResult]]:
    """The step job of one robustness check. Every line runs on the device thread: the first
    ``next()`` builds the targets and moves the images to the device, each later one is a PGD step;
    the job's value is one result per model, in ``thresholds`` order."""
    targets = [Target(n, engine.metric(n), t) for n, t in thresholds.items()]
    cand = None if candidate is None else to_unit(candidate.tensor[None])
    job = RobustnessJob(to_unit(reference.tensor[None]), cand, targets, spec, mirror)
    for _ in job.steps():
        yield
    return job.results()[0]


class Runtime:
    """Everything that serves requests; ``start()`` loads and warms the models on the device thread."""

    def __init__(self, settings: Settings, store: ModelStore, telemetry: Telemetry) -> None:
        self.settings = settings
        self.store = store
        self.telemetry = telemetry
        self.default_model, self.models = configured_models(settings, store)
        self.device = pick_device(settings.device)
        self.resolution = settings.resolution
        self.limits = DecodeLimits(
            max_pixels=settings.max_pixels, max_scans=settings.max_jpeg_scans
        )
        cache = FeatureCache(settings.cache_entries, settings.cache_bytes)
        self.streams, self.torch_threads = cpu_threads(settings, self.device)
        self.engine = Engine(
            store,
            self.models,
            self.device,
            settings.resolution,
            cache,
            telemetry,
            streams=self.streams,
            precision=resolve_precision(settings.precision, self.device),
            channels_last=settings.channels_last,
        )
        self.worker = DeviceWorker("rlpips-device", initializer=self._init_device_thread)
        #: Test hook: called on the device thread with each distance batch before the engine runs it
        #: (tests install one to inject faults or delays; ``None`` in production).
        self.fault_hook: Callable[[list[Query]], None] | None = None
        self.batcher: MicroBatcher[Query, Answer] = MicroBatcher(
            self.worker,
            self._process,
            max_batch=settings.max_batch_pairs,
            max_wait_s=settings.max_wait_ms / 1000,
            queue_size=settings.queue_size,
            observer=telemetry,
            split_on=is_out_of_memory,
            max_failures=settings.max_batch_failures,
        )
        self.jobs = JobRunner(self.worker, settings.max_attack_jobs, telemetry)
        self.decoder = DecodeScheduler(
            decode_threads(settings), settings.decode_heavy_pixels, settings.decode_queue_pixels
        )
        self.started = False
        self.draining = False
        telemetry.watch_runtime(
            ready=lambda: self.ready,
            draining=lambda: self.draining,
            attacks=lambda: self.jobs.active,
            cache=cache,
        )
        telemetry.runtime_info(str(self.device), self.engine.precision, self.default_model)
        self._probed_at = -math.inf
        self._threads_before = torch.get_num_threads()

    # -- state ---------------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Models loaded and warmed, worker and batcher alive, not shutting down: work is taken."""
        return self.started and not self.draining and self.batcher.alive

    @property
    def ready(self) -> bool:
        """Accepting, and the device is not failing batch after batch."""
        return self.accepting and not self.batcher.failing

    @property
    def loaded(self) -> set[str]:
        return set(self.engine.heads)

    def threshold(self, model: str) -> float:
        """The store's near-duplicate threshold of ``model``."""
        return self.store.model(model).threshold

    # -- the pipeline --------------------------------------------------------------------------

    def check_distance(self, pairs: int) -> None:
        """Raise what :meth:`distance` would raise at admission now (call before decoding)."""
        self.batcher.check_admission(pairs)

    def check_attack(self) -> None:
        """Raise what :meth:`attack` would raise at admission now (call before decoding)."""
        self.jobs.check_admission()

    async def decode(
        self, inputs: Sequence[tuple[str, bytes]], timeout_s: float, for_batch: bool = False
    ) -> list[Image]:
        """Decode + resize every ``(name, bytes)`` to ``[3, R, R]`` in ``[-1, 1]``, within ``timeout_s``.
        ``for_batch`` (images bound for :meth:`distance`) with ``RLPIPS_DECODE_DEVICE=device``: JPEGs
        the device decoder accepts are only checked here and decode with their micro-batch.

        First every header is read and checked (an :class:`ImageError` names its input), the request's
        decode cost is held to ``max_request_pixels`` (:class:`ImageTooLarge`) and admitted to the
        decode lanes (:class:`Overloaded` when they are full); then the images decode concurrently.
        Past the deadline :class:`DeadlineExceeded` (work already running finishes in its thread,
        bounded by its cost)."""
        try:
            async with asyncio.timeout(timeout_s):
                headers = await self.decoder.run(partial(self._headers, inputs))
                self._check_cost(inputs, headers)
                defer = for_batch and self.settings.decode_device == "device"
                jobs = [
                    (
                        partial(self._prepare, d, n, defer and h.cost <= self.decoder.heavy_cost),
                        h.cost,
                    )
                    for (n, d), h in zip(inputs, headers, strict=True)
                ]
                try:
                    futures = self.decoder.submit(jobs)
                except Overloaded:
                    self.telemetry.rejected("decode_full")
                    raise
                waits = [asyncio.wrap_future(f) for f in futures]
                results = await asyncio.gather(*waits, return_exceptions=True)
        except TimeoutError:
            self.telemetry.rejected("deadline")
            raise DeadlineExceeded("the request ran past its deadline while decoding") from None
        images: list[Image] = []
        for (name, _), r in zip(inputs, results, strict=True):
            if isinstance(r, ImageError):
                raise r.at(name)
            if isinstance(r, BaseException):
                raise r
            images.append(r)
        return images

    def _headers(self, inputs: Sequence[tuple[str, bytes]]) -> list[Header]:
        """Every input's checked header (decode pool); an error names its input."""
        headers = []
        for name, data in inputs:
            try:
                headers.append(inspect(data, self.limits))
            except ImageError as exc:
                raise exc.at(name) from None
        return headers

    def _check_cost(self, inputs: Sequence[tuple[str, bytes]], headers: list[Header]) -> None:
        """:class:`ImageTooLarge`, naming the image that crosses it, when the request's decode cost is
        over ``max_request_pixels``."""
        limit, total = self.settings.max_request_pixels, 0
        for (name, _), h in zip(inputs, headers, strict=True):
            total += h.cost
            if total > limit:
                raise ImageTooLarge(
                    f"decoding this request's images would cost {sum(x.cost for x in headers)} "
                    f"pixel units ({h.width}x{h.height} {h.format} here), over the limit of "
                    f"{limit} per request",
                    name,
                )

    async def distance(self, query: Query, timeout_s: float) -> Completed[Answer]:
        """Score ``query`` in a micro-batch on the device (admission, deadline and cancellation as in
        :meth:`MicroBatcher.submit`)."""
        return await self.batcher.submit(query, query.work, timeout_s)

    async def attack(
        self,
        reference: Image,
        candidate: Image | None,
        thresholds: dict[str, float],
        spec: AttackSpec,
        timeout_s: float,
        invariance: tuple[Invariance, ...] = (),
    ) -> Completed[list[ModelResult]]:
        """Attack ``candidate`` (or the reference itself) under each model of ``thresholds`` (name →
        near-duplicate threshold) as a step job: built and run on the device thread, one PGD step per
        turn so distance batches go first. ``spec`` must be resolved (every default filled);
        ``invariance`` as in :class:`Query` (the attacked distance is the invariant one)."""
        mirror = "hflip" in invariance
        job = _attack_job(self.engine, reference, candidate, thresholds, spec, mirror)
        return await self.jobs.run(job, timeout_s)

    async def run_cpu(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` (small CPU work such as PNG encoding) on the decode pool's normal lane."""
        return await self.decoder.run(fn)

    def probe(self) -> None:
        """While failing: send one tiny pair through the batcher (at most every ``PROBE_EVERY_S``), so
        that readiness comes back by itself once the device works again, even without traffic."""
        now = time.monotonic()
        if not self.accepting or now - self._probed_at < PROBE_EVERY_S:
            return
        self._probed_at = now
        blank = Image(torch.zeros(3, self.resolution, self.resolution), "readiness-probe")
        query = Query(self.default_model, blank, (blank,))
        task = asyncio.ensure_future(self.distance(query, self.settings.deadline_s))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _prepare(self, data: bytes, source: str = "", defer: bool = False) -> Image:
        """Decode + resize one image to the working resolution (runs on a decode lane); ``defer``: a
        JPEG the device decoder accepts stays encoded, for :meth:`_process`."""
        if defer and device_decode.accepts(data):
            return Image(torch.empty(0), content_key(data), data, source)
        t0 = time.perf_counter()
        image = Image(self._decode_one(data), content_key(data))
        self.telemetry.decoded(time.perf_counter() - t0)
        return image

    def _decode_one(self, data: bytes) -> Tensor:
        return load_tensor(data, self.resolution, self.limits, self.settings.jpeg_draft)

    def _process(self, queries: list[Query]) -> list[Answer | Exception]:
        """The batcher's ``process`` (device thread): the fault hook if installed, the batch's pending
        JPEGs decoded on the device (a query whose image fails gets its error), then the engine."""
        if self.fault_hook is not None:
            self.fault_hook(queries)
        if self.settings.decode_device != "device":  # every image decoded already
            return list(self.engine(queries))
        pending = len({i.key for q in queries for i in (q.reference, *q.candidates) if i.jpeg})
        t0 = time.perf_counter()
        ready, errors = device_decode.decode_pending(
            queries, self.resolution, self.device, self._decode_one
        )
        for _ in range(pending):  # one observation per image: the batch's mean
            self.telemetry.decoded((time.perf_counter() - t0) / pending)
        answers = iter(self.engine(ready) if ready else [])
        return [errors[i] if i in errors else next(answers) for i in range(len(queries))]

    # -- life cycle ----------------------------------------------------------------------------

    def _init_device_thread(self) -> None:
        """On CUDA: select the device, and let cuDNN pick the fastest kernels per input shape (the
        working resolution is fixed, so only the batch size varies)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True

    def _load(self) -> None:
        t0 = time.perf_counter()
        self.engine.load()
        self.engine.warmup()
        log.info(
            "models %s loaded and warmed on %s at %dx%d, trunk precision %s, %s layout, in %.1f s "
            "(%d streams, %d intra-op threads)",
            ", ".join(self.models),
            self.device,
            self.resolution,
            self.resolution,
            str(self.engine.precision).removeprefix("torch."),
            "channels-last" if self.engine.channels_last else "contiguous",
            time.perf_counter() - t0,
            self.streams,
            torch.get_num_threads(),
        )

    async def start(self) -> None:
        self._threads_before = torch.get_num_threads()
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        self.worker.start()
        await asyncio.wrap_future(self.worker.submit(self._load))
        for name in self.models:
            self.telemetry.model_loaded(name, self.engine.trunk_of[name], str(self.device))
        self.telemetry.watch_device(self.device)
        self.batcher.start()
        self.started = True

    async def stop(self) -> None:
        """Refuse new work, finish queued work, stop the threads; each wait is bounded by
        ``STOP_WAIT_S`` (in a served app no request is left by then: see :mod:`app.cli.serve`)."""
        self.draining = True
        self.jobs.close()
        wait_s = min(self.settings.deadline_s, STOP_WAIT_S)
        await self.batcher.close(timeout_s=wait_s)
        await asyncio.to_thread(self.worker.stop, wait_s)
        self.decoder.shutdown()
        torch.set_num_threads(self._threads_before)  # process-global: leave it as it was
