"""The decode scheduler (generic, no images): admission by cost per lane, all or nothing; costs released
exactly when work ends or is cancelled unstarted; the heavy lane runs one item at a time."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.serving.decoding import DecodeScheduler
from app.serving.errors import Overloaded


def test_admission_is_per_lane_and_all_or_nothing() -> None:
    s = DecodeScheduler(threads=2, heavy_cost=100, max_queued=1000)
    gate = threading.Event()
    try:
        held = s.submit([(gate.wait, 600), (gate.wait, 50)])  # 600 heavy, 50 normal
        assert (s.queued("heavy"), s.queued("normal")) == (600, 50)
        with pytest.raises(Overloaded) as info:
            s.submit([(lambda: None, 10), (lambda: None, 500)])  # the heavy part does not fit
        assert info.value.retry_after_s >= 1
        assert (s.queued("heavy"), s.queued("normal")) == (600, 50)  # nothing of it was admitted
        s.submit([(lambda: None, 100)] * 9)  # the normal lane still has room for 900
    finally:
        gate.set()
    for f in held:
        f.result(10)


def test_costs_are_released_when_work_ends_or_is_cancelled_unstarted() -> None:
    s = DecodeScheduler(threads=1, heavy_cost=10**9, max_queued=1000)
    gate, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(10)

    running, queued = s.submit([(hold, 100), (lambda: None, 200)])
    assert started.wait(10) and s.queued("normal") == 300
    assert queued.cancel()  # never ran: released at once
    assert s.queued("normal") == 100
    assert not running.cancel()  # running: released only when it ends
    gate.set()
    running.result(10)
    deadline = time.monotonic() + 5
    while s.queued("normal") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.queued("normal") == 0


async def test_a_caller_that_gives_up_leaves_no_cost_behind() -> None:
    s = DecodeScheduler(threads=1, heavy_cost=10**9, max_queued=1000)
    gate = threading.Event()
    futures = s.submit([(lambda: gate.wait(10), 100), (lambda: None, 200)])
    waiting = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await waiting
    gate.set()
    for _ in range(500):
        if s.queued("normal") == 0:
            break
        await asyncio.sleep(0.01)
    assert s.queued("normal") == 0


def test_the_heavy_lane_runs_one_item_at_a_time() -> None:
    s = DecodeScheduler(threads=4, heavy_cost=10, max_queued=10**6)
    active, peak = 0, 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with lock:
            active -= 1

    for f in s.submit([(work, 100)] * 6):
        f.result(10)
    assert peak == 1
    assert s.lane_of(10) == "normal" and s.lane_of(11) == "heavy"
