"""Micro-batching — generic: nothing here knows about images, HTTP or torch.

:class:`MicroBatcher` is the asyncio side of batched device work: bounded admission (in item *sizes*,
e.g. pairs), per-item deadlines, and one collector task that waits for the first item, then for more until
``max_batch`` or ``max_wait_s`` after that item arrived, and hands the batch to the device worker
(:mod:`app.serving.worker`) — one batch at a time. Items that were cancelled (client gone) or expired are dropped
before they reach the device, also when that happens while their batch waits for the device thread. Every future is resolved exactly once; an exception in ``process`` fails only
that batch's futures, except that a failure the ``split_on`` predicate accepts (device out of memory) is
retried as two half batches first. ``failing`` turns on after ``max_failures`` consecutive failed batches.
The observer hooks and the :class:`Completed` result shared with the worker live here too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar, cast

from app.serving.errors import DeadlineExceeded, Draining, Overloaded, WorkerStopped

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Lane = Literal["batch", "step"]


class BatchObserver(Protocol):
    """Hooks for metrics; every method must be cheap and must not raise."""

    def queue_depth(self, size: int) -> None: ...
    def batch_done(self, size: int, waits_s: Sequence[float], device_s: float) -> None: ...
    def step_done(self, device_s: float) -> None: ...
    def rejected(self, reason: str) -> None: ...


class NullObserver:
    """A :class:`BatchObserver` that records nothing."""

    def queue_depth(self, size: int) -> None:
        pass

    def batch_done(self, size: int, waits_s: Sequence[float], device_s: float) -> None:
        pass

    def step_done(self, device_s: float) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass


class Executor(Protocol):
    """Where batches run (:class:`app.serving.worker.DeviceWorker`)."""

    @property
    def alive(self) -> bool: ...
    def submit(self, fn: Callable[[], R], lane: Lane = "batch") -> cf.Future[R]: ...


@dataclass(frozen=True)
class Completed(Generic[R]):
    """A result with its timings: ``queued_s`` from admission to the device, ``device_s`` on the device."""

    value: R
    queued_s: float
    device_s: float


_State = Literal["queued", "running", "abandoned", "done"]


class _Skipped:
    """The item was no longer wanted when the device got to it."""


_SKIPPED = _Skipped()


@dataclass(frozen=True)
class _Failed:
    """The item failed (the exception is raised to its caller): the device failed its batch, or
    ``process`` refused the item alone (``device=False``, e.g. its image would not decode)."""

    error: Exception
    device: bool = True


@dataclass(eq=False)
class _Item(Generic[T, R]):
    payload: T
    size: int
    enqueued: float
    deadline: float
    future: asyncio.Future[Completed[R]]
    state: _State = "queued"
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class MicroBatcher(Generic[T, R]):
    """Groups submitted items into batches for ``process(payloads) -> results`` (same order, same length;
    an ``Exception`` in place of a result fails that item alone).

    ``process`` runs on the worker's batch lane. Sizes are counted in the caller's unit (pairs): a batch
    holds at most ``max_batch`` of it, except that an item larger than ``max_batch`` runs alone. Admission
    refuses an item when the queued size would exceed ``queue_size``.
    """

    def __init__(
        self,
        worker: Executor,
        process: Callable[[list[T]], Sequence[R | Exception]],
        *,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        observer: BatchObserver | None = None,
        split_on: Callable[[BaseException], bool] | None = None,
        max_failures: int = 3,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError(
                f"need max_batch ≥ 1, queue_size ≥ 1, max_wait_s ≥ 0; "
                f"got {max_batch}, {queue_size}, {max_wait_s}"
            )
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._worker = worker
        self._process = process
        self._observer: BatchObserver = observer or NullObserver()
        self._pending: deque[_Item[T, R]] = deque()
        self._pending_size = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._collector: asyncio.Task[None] | None = None
        self._seconds_per_unit = 0.0  # EMA of device time per size unit, for Retry-After
        self._split_on = split_on or (lambda _exc: False)
        self.max_failures = max_failures
        self.failures = 0  # consecutive batches whose every item failed

    @property
    def depth(self) -> int:
        """Queued size (pairs) not yet handed to the device."""
        return self._pending_size

    @property
    def failing(self) -> bool:
        """The last ``max_failures`` batches all failed (the device is likely broken)."""
        return self.failures >= self.max_failures

    @property
    def alive(self) -> bool:
        running = self._collector is not None and not self._collector.done()
        return running and not self._closing and self._worker.alive

    def start(self) -> None:
        """Start the collector task (call inside the running event loop)."""
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(
                self._collect(), name="micro-batcher"
            )

    async def submit(
        self, payload: T, size: int = 1, timeout_s: float | None = None
    ) -> Completed[R]:
        """Queue one item and wait for its result.

        Raises :class:`Overloaded` (queue full), :class:`DeadlineExceeded` (``timeout_s`` passed before the
        result), :class:`Draining`, :class:`WorkerStopped`, or whatever ``process`` raised for the batch.
        """
        if size < 1:
            raise ValueError(f"size must be ≥ 1, got {size}")
        self.check_admission(size)
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = math.inf if timeout_s is None else now + max(timeout_s, 0.0)
        item: _Item[T, R] = _Item(payload, size, now, deadline, loop.create_future())
        if timeout_s is not None:
            item.timer = loop.call_at(deadline, self._expire, item)
        item.future.add_done_callback(lambda _f: self._on_done(item))
        self._pending.append(item)
        self._pending_size += size
        self._observer.queue_depth(self._pending_size)
        self._wakeup.set()
        return await item.future

    def check_admission(self, size: int) -> None:
        """Raise what :meth:`submit` would raise before queueing ``size`` now (:class:`Overloaded`
        when the queue is full): callers check before costly preparation such as decoding."""
        if self._closing:
            raise Draining("the service is shutting down")
        if not self.alive:
            raise WorkerStopped("the batcher is not running")
        if self._pending_size + size > self.queue_size:
            self._observer.rejected("overloaded")
            raise Overloaded(
                f"admission queue full ({self._pending_size} of {self.queue_size} queued)",
                self.retry_after_s(),
            )

    def retry_after_s(self) -> int:
        """Seconds until the current queue should have drained (≥ 1)."""
        return max(1, min(60, math.ceil(self._pending_size * self._seconds_per_unit)))

    async def close(self, timeout_s: float | None = None) -> None:
        """Refuse new work, finish queued work (up to ``timeout_s``), then stop the collector."""
        self._closing = True
        self._wakeup.set()
        if self._collector is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._collector), timeout_s)
        if not self._collector.done():
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        self._fail_pending(Draining("the service shut down before this request ran"))

    # -- item life cycle ----------------------------------------------------------------------

    def _expire(self, item: _Item[T, R]) -> None:
        if not item.future.done():
            item.future.set_exception(DeadlineExceeded("the request waited past its deadline"))

    def _on_done(self, item: _Item[T, R]) -> None:
        """Account for an item whose future completed; drops it from the queue if still queued."""
        if item.timer is not None:
            item.timer.cancel()
        if item.state in ("queued", "running"):
            reason = "cancelled" if item.future.cancelled() else "deadline"
            if item.state == "queued":
                self._pending_size -= item.size
                self._observer.queue_depth(self._pending_size)
            item.state = "abandoned"
            self._observer.rejected(reason)

    @staticmethod
    def _live(item: _Item[T, R]) -> bool:
        """Still waiting for the device (a done future's callback may not have run yet)."""
        return item.state == "queued" and not item.future.done()

    def _fail_pending(self, exc: Exception) -> None:
        while self._pending:
            item = self._pending.popleft()
            if item.state == "queued" and not item.future.done():
                item.future.set_exception(exc)

    # -- collector ------------------------------------------------------------------------------

    async def _collect(self) -> None:
        try:
            while batch := await self._next_batch():
                await self._run(batch)
        except Exception:
            log.exception("micro-batcher collector failed")
            self._fail_pending(WorkerStopped("the batcher failed"))
            raise

    async def _next_batch(self) -> list[_Item[T, R]]:
        """Wait for the first live item, then for more until full or its ``max_wait_s`` passed."""
        loop = asyncio.get_running_loop()
        while True:
            while self._pending and not self._live(self._pending[0]):
                self._pending.popleft()
            if self._pending:
                break
            if self._closing:
                return []
            self._wakeup.clear()
            await self._wakeup.wait()
        flush_at = self._pending[0].enqueued + self.max_wait_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(flush_at):
                while self._pending_size < self.max_batch and not self._closing:
                    self._wakeup.clear()
                    await self._wakeup.wait()
        return self._take(loop.time())

    def _take(self, now: float) -> list[_Item[T, R]]:
        batch: list[_Item[T, R]] = []
        size = 0
        while self._pending:
            item = self._pending[0]
            if not self._live(item):
                self._pending.popleft()
                continue
            if item.deadline <= now:
                self._expire(item)  # its done-callback drops and counts it
                self._pending.popleft()
                continue
            if batch and size + item.size > self.max_batch:
                break
            self._pending.popleft()
            item.state = "running"
            self._pending_size -= item.size
            size += item.size
            batch.append(item)
        self._observer.queue_depth(self._pending_size)
        return batch

    async def _run(self, batch: list[_Item[T, R]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        waits = [started - i.enqueued for i in batch]
        try:
            work = self._worker.submit(lambda: self._on_device(batch))
            results, device_s = await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            self._resolve(batch, Draining("the service shut down while this request ran"))
            raise
        except Exception as exc:  # the worker itself refused (stopped): not a device fault
            self._resolve(batch, exc)
            return
        ran = [
            (i, r, w) for i, r, w in zip(batch, results, waits, strict=True) if r is not _SKIPPED
        ]
        if not ran:
            return  # every item expired or was cancelled while the batch waited for the device
        failed = sum(isinstance(r, _Failed) and r.device for _, r, _ in ran)
        self.failures = self.failures + 1 if failed == len(ran) else 0
        if failed < len(ran):
            size = sum(i.size for i, _, _ in ran)
            self._seconds_per_unit = 0.8 * self._seconds_per_unit + 0.2 * device_s / size
            self._observer.batch_done(size, [w for _, _, w in ran], device_s)
        for item, result, wait in ran:
            if not self._settle(item):
                continue
            if isinstance(result, _Failed):
                item.future.set_exception(result.error)
            else:
                item.future.set_result(Completed(cast(R, result), wait, device_s))

    def _on_device(self, batch: list[_Item[T, R]]) -> tuple[list[R | _Failed | _Skipped], float]:
        """Runs on the device thread once the device is free: items that expired or were cancelled
        meanwhile (their future is done) are skipped, the rest are processed. ``(results, seconds)``."""
        live = [i for i in batch if not i.future.done()]
        if not live:
            return [_SKIPPED] * len(batch), 0.0
        t0 = time.perf_counter()
        out = iter(self._guarded([i.payload for i in live]))
        device_s = time.perf_counter() - t0
        ids = {id(i) for i in live}
        return [next(out) if id(i) in ids else _SKIPPED for i in batch], device_s

    def _guarded(self, payloads: list[T]) -> list[R | _Failed]:
        """``process(payloads)`` on the device thread, never raising: a failure becomes one
        :class:`_Failed` per item. A failure that ``split_on`` accepts (device out of memory) is
        retried as two halves, recursively, before it fails the items that still cannot run."""
        try:
            results: list[R | _Failed] = [
                _Failed(r, device=False) if isinstance(r, Exception) else r
                for r in self._process(payloads)
            ]
            if len(results) != len(payloads):
                raise RuntimeError(
                    f"process returned {len(results)} results for {len(payloads)} items"
                )
            return results
        except Exception as exc:
            if len(payloads) > 1 and self._split_on(exc):
                half = len(payloads) // 2
                log.warning(
                    "device batch of %d items failed (%r); retrying as %d + %d",
                    len(payloads), exc, half, len(payloads) - half,
                )  # fmt: skip
                return self._guarded(payloads[:half]) + self._guarded(payloads[half:])
            exc.add_note(f"in a device batch of {len(payloads)} items")
            log.warning("device batch of %d items failed: %r", len(payloads), exc)
            return [_Failed(exc)] * len(payloads)

    @staticmethod
    def _settle(item: _Item[T, R]) -> bool:
        """Claim a running item for resolution: ``False`` when it was already cancelled or expired."""
        if item.state != "running" or item.future.done():
            return False
        item.state = "done"
        return True

    @classmethod
    def _resolve(cls, batch: list[_Item[T, R]], exc: BaseException) -> None:
        for item in batch:
            if cls._settle(item):
                item.future.set_exception(exc)
