"""The decode stage's scheduler: CPU work with a cost known in advance, admitted and run on two lanes.

Generic: nothing here knows about images. Each work item carries a *cost* (for decoding: pixel units,
decided from the header before any expensive work). Items up to ``heavy_cost`` run on the *normal* lane
(a pool of threads); costlier ones on the *heavy* lane, one thread at a lower OS priority, so a flood of
expensive items uses at most one core and yields it to normal traffic. Admission is all-or-nothing per
request and bounded per lane by the cost queued or running (``max_queued``): beyond it
:class:`~app.serving.errors.Overloaded`. An item's cost is released when its work ends or when it is
cancelled before it started — never earlier — so the bound holds even when callers gave up waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from app.serving.errors import Overloaded

log = logging.getLogger(__name__)
R = TypeVar("R")
LaneName = Literal["normal", "heavy"]

#: OS priority (nice value) of the heavy lane's thread.
HEAVY_NICE = 10


def _lower_priority() -> None:
    """Thread initializer: raise this thread's nice value (Linux: threads have their own)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HEAVY_NICE)


class _Lane:
    def __init__(self, name: LaneName, threads: int, max_queued: int) -> None:
        initializer = _lower_priority if name == "heavy" else None
        self.pool = cf.ThreadPoolExecutor(threads, f"rlpips-decode-{name}", initializer)
        self.max_queued = max_queued
        self.queued = 0  # cost admitted and not yet finished (guarded by DecodeScheduler._lock)


class DecodeScheduler:
    """Admits and runs costed CPU work on a normal and a heavy lane (see the module docstring)."""

    def __init__(self, threads: int, heavy_cost: int, max_queued: int) -> None:
        if threads < 1 or heavy_cost < 1 or max_queued < 1:
            raise ValueError(
                f"need threads, heavy_cost and max_queued ≥ 1, got {threads}, {heavy_cost}, "
                f"{max_queued}"
            )
        self.heavy_cost = heavy_cost
        self._lanes: dict[LaneName, _Lane] = {
            "normal": _Lane("normal", threads, max_queued),
            "heavy": _Lane("heavy", 1, max_queued),
        }
        self._lock = threading.Lock()
        self._cost_per_second = 50e6  # EMA of cost decoded per second of work, for Retry-After

    def lane_of(self, cost: int) -> LaneName:
        return "heavy" if cost > self.heavy_cost else "normal"

    def queued(self, lane: LaneName) -> int:
        """Cost admitted on ``lane`` and not yet finished."""
        return self._lanes[lane].queued

    def submit(self, jobs: Sequence[tuple[Callable[[], R], int]]) -> list[cf.Future[R]]:
        """Admit ``(fn, cost)`` jobs (one request's), all or nothing — :class:`Overloaded` when a lane
        would go over its bound — and queue each on its lane at once. A job's cost is released when its
        future ends or is cancelled before it ran (admission and queueing have no await between them,
        so no admitted cost can be lost to a cancellation)."""
        need: dict[LaneName, int] = {"normal": 0, "heavy": 0}
        for _, cost in jobs:
            need[self.lane_of(cost)] += cost
        with self._lock:
            for name, extra in need.items():
                lane = self._lanes[name]
                if extra and lane.queued + extra > lane.max_queued:
                    wait = math.ceil(lane.queued / self._cost_per_second)
                    raise Overloaded(
                        f"the {name} decode queue is full ({lane.queued} of {lane.max_queued} "
                        "pixels queued)",
                        max(1, min(60, wait)),
                    )
            for name, extra in need.items():
                self._lanes[name].queued += extra
        return [self._queue(fn, cost) for fn, cost in jobs]

    def _queue(self, fn: Callable[[], R], cost: int) -> cf.Future[R]:
        lane = self._lanes[self.lane_of(cost)]

        def timed() -> R:
            started = time.perf_counter()
            try:
                return fn()
            finally:
                seconds = max(time.perf_counter() - started, 1e-3)
                self._cost_per_second = 0.9 * self._cost_per_second + 0.1 * cost / seconds

        try:
            future = lane.pool.submit(timed if cost else fn)
        except RuntimeError:  # shut down
            self._release(lane, cost)
            raise
        if cost:
            future.add_done_callback(lambda _f: self._release(lane, cost))
        return future

    def _release(self, lane: _Lane, cost: int) -> None:
        with self._lock:
            lane.queued -= cost

    async def run(self, fn: Callable[[], R]) -> R:
        """Run cheap, unadmitted work (reading headers, encoding PNGs) on the normal lane."""
        return await asyncio.wrap_future(self._queue(fn, 0))

    def shutdown(self) -> None:
        """Cancel queued work (running items finish in their threads)."""
        for lane in self._lanes.values():
            lane.pool.shutdown(wait=False, cancel_futures=True)
