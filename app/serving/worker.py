"""The device worker: one thread that owns the device, and step jobs that share it with batches.

* :class:`DeviceWorker` runs two lanes of work: *batches* first, then *steps* of long jobs, one bounded
  step at a time (FIFO, so active jobs take turns). A job delays a batch by at most one step; jobs can
  never starve batches.
* :class:`JobRunner` runs *step jobs* — iterators whose every ``next()`` is one bounded unit of device
  work (e.g. one PGD step); the job's result is the value carried by ``StopIteration`` (a generator's
  ``return`` value) — on the step lane, at most ``max_jobs`` at once.

Generic: nothing here knows about images, HTTP or torch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from app.serving.batching import BatchObserver, Completed, Lane, NullObserver
from app.serving.errors import DeadlineExceeded, Draining, Overloaded, WorkerStopped

log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(eq=False)
class _Task:
    fn: Callable[[], Any]
    future: cf.Future[Any]


class DeviceWorker:
    """A single thread that runs every piece of device work; batches have priority over job steps."""

    def __init__(
        self, name: str = "device-worker", initializer: Callable[[], None] | None = None
    ) -> None:
        self._cond = threading.Condition()
        self._lanes: dict[Lane, deque[_Task]] = {"batch": deque(), "step": deque()}
        self._stopping = False
        self._initializer = initializer
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def backlog(self) -> int:
        """Tasks queued (not running) on both lanes."""
        with self._cond:
            return sum(len(lane) for lane in self._lanes.values())

    def start(self) -> None:
        self._thread.start()

    def submit(self, fn: Callable[[], R], lane: Lane = "batch") -> cf.Future[R]:
        """Queue ``fn`` on ``lane``; its result or exception arrives in the returned future."""
        future: cf.Future[R] = cf.Future()
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                raise WorkerStopped("the device worker is not running")
            self._lanes[lane].append(_Task(fn, future))
            self._cond.notify()
        return future

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish queued work, then end the thread (waits up to ``timeout_s``)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _next(self) -> _Task | None:
        with self._cond:
            while True:
                for lane in ("batch", "step"):
                    if self._lanes[lane]:
                        return self._lanes[lane].popleft()
                if self._stopping:
                    return None
                self._cond.wait()

    def _run(self) -> None:
        try:
            if self._initializer is not None:
                self._initializer()
            while (task := self._next()) is not None:
                if not task.future.set_running_or_notify_cancel():
                    continue
                try:
                    task.future.set_result(task.fn())
                except Exception as exc:
                    task.future.set_exception(exc)
        except BaseException:
            log.exception("device worker died")
            raise
        finally:
            with self._cond:
                self._stopping = True
                left = [t for lane in self._lanes.values() for t in lane]
                for lane_tasks in self._lanes.values():
                    lane_tasks.clear()
            for t in left:
                if t.future.set_running_or_notify_cancel():
                    t.future.set_exception(WorkerStopped("the device worker stopped"))


_Step = tuple[bool, Any, float]


def _one_step(job: Iterator[Any]) -> _Step:
    """Advance ``job`` once on the device thread: ``(finished, result, seconds)``."""
    t0 = time.perf_counter()
    try:
        next(job)
    except StopIteration as stop:
        return True, stop.value, time.perf_counter() - t0
    return False, None, time.perf_counter() - t0


class JobRunner:
    """Runs step jobs on the worker's step lane, at most ``max_jobs`` at a time."""

    def __init__(
        self, worker: DeviceWorker, max_jobs: int, observer: BatchObserver | None = None
    ) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be ≥ 1, got {max_jobs}")
        self.max_jobs = max_jobs
        self._worker = worker
        self._observer: BatchObserver = observer or NullObserver()
        self._active = 0
        self._closing = False
        self._job_seconds = 1.0  # EMA of a job's wall time, for Retry-After

    @property
    def active(self) -> int:
        return self._active

    def check_admission(self) -> None:
        """Raise what :meth:`run` would raise before starting a job now (:class:`Overloaded` when
        ``max_jobs`` are running): callers check before costly preparation such as decoding."""
        if self._closing:
            raise Draining("the service is shutting down")
        if self._active >= self.max_jobs:
            self._observer.rejected("jobs_full")
            raise Overloaded(
                f"{self._active} of {self.max_jobs} attack jobs are running",
                max(1, math.ceil(self._job_seconds)),
            )

    def close(self) -> None:
        """Refuse new jobs (running ones continue)."""
        self._closing = True

    @overload
    async def run(
        self, job: Generator[Any, Any, R], timeout_s: float | None = None
    ) -> Completed[R]: ...
    @overload
    async def run(self, job: Iterator[Any], timeout_s: float | None = None) -> Completed[Any]: ...

    async def run(self, job: Iterator[Any], timeout_s: float | None = None) -> Completed[Any]:
        """Run ``job`` to its end, one step per turn; batches go first between steps.

        Raises :class:`Overloaded` when ``max_jobs`` jobs are running, :class:`DeadlineExceeded` after
        ``timeout_s``, or what the job raised. An unfinished job is closed on the worker thread.
        """
        self.check_admission()
        self._active += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        device_s = 0.0
        finished = False
        try:
            async with asyncio.timeout(timeout_s):
                while not finished:
                    work = self._worker.submit(lambda: _one_step(job), lane="step")
                    finished, result, step_s = await asyncio.wrap_future(work)
                    device_s += step_s
                    self._observer.step_done(step_s)
        except TimeoutError:
            self._observer.rejected("deadline")
            raise DeadlineExceeded("the job ran past its deadline") from None
        except asyncio.CancelledError:
            self._observer.rejected("cancelled")
            raise
        finally:
            self._active -= 1
            if not finished:
                self._close_job(job)
        wall = loop.time() - started
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * wall
        return Completed(result, max(0.0, wall - device_s), device_s)

    def _close_job(self, job: Iterator[Any]) -> None:
        close = getattr(job, "close", None)
        if callable(close):
            with contextlib.suppress(WorkerStopped):
                self._worker.submit(close, lane="step")
