"""The micro-batcher and device worker with a fake model: batching happens, and every failure mode."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence

import pytest

from app.serving.batching import MicroBatcher
from app.serving.errors import DeadlineExceeded, Draining, Overloaded, WorkerStopped
from app.serving.worker import DeviceWorker, JobRunner


class Recorder:
    """Fake observer that keeps everything it is told."""

    def __init__(self) -> None:
        self.depths: list[int] = []
        self.batches: list[int] = []
        self.steps = 0
        self.rejections: list[str] = []

    def queue_depth(self, size: int) -> None:
        self.depths.append(size)

    def batch_done(self, size: int, waits_s: Sequence[float], device_s: float) -> None:
        self.batches.append(size)

    def step_done(self, device_s: float) -> None:
        self.steps += 1

    def rejected(self, reason: str) -> None:
        self.rejections.append(reason)


class FakeModel:
    """Doubles each payload; records every batch it sees; can be held (gate) or made slow or to fail."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.seen: list[list[int]] = []
        self.events: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.threads: set[str] = set()

    def __call__(self, payloads: list[int]) -> list[int]:
        self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        self.seen.append(list(payloads))
        self.events.append("batch")
        time.sleep(self.delay_s)
        if any(p < 0 for p in payloads):
            raise RuntimeError("negative payload")
        return [2 * p for p in payloads]

    @property
    def processed(self) -> list[int]:
        return [p for b in self.seen for p in b]


Factory = Callable[..., MicroBatcher[int, int]]


@pytest.fixture
async def make() -> AsyncIterator[tuple[Factory, Recorder, DeviceWorker]]:
    worker = DeviceWorker("test-device")
    worker.start()
    rec = Recorder()
    made: list[MicroBatcher[int, int]] = []

    def factory(model: FakeModel, **kw: float) -> MicroBatcher[int, int]:
        opts: dict[str, float] = {"max_batch": 8, "max_wait_s": 0.02, "queue_size": 64, **kw}
        b: MicroBatcher[int, int] = MicroBatcher(
            worker,
            model,
            max_batch=int(opts["max_batch"]),
            max_wait_s=opts["max_wait_s"],
            queue_size=int(opts["queue_size"]),
            observer=rec,
        )
        b.start()
        made.append(b)
        return b

    yield factory, rec, worker
    for b in made:
        await b.close(timeout_s=5)
    worker.stop(timeout_s=5)


async def test_concurrent_items_form_batches_larger_than_one(make) -> None:
    factory, rec, _ = make
    model = FakeModel()
    b = factory(model, max_wait_s=0.05)
    out = await asyncio.gather(*(b.submit(i) for i in range(12)))
    assert [c.value for c in out] == [2 * i for i in range(12)]
    assert max(len(s) for s in model.seen) > 1
    assert sorted(model.processed) == list(range(12))
    assert sum(rec.batches) == 12
    assert model.threads == {"test-device"}


async def test_flush_at_max_batch_counts_item_sizes(make) -> None:
    factory, rec, _ = make
    model = FakeModel()
    model.gate.clear()  # hold the device so that everything queues up
    b = factory(model, max_batch=4, max_wait_s=0.01)
    first = asyncio.ensure_future(b.submit(100))
    await asyncio.sleep(0.05)  # the first batch [100] is on the device, blocked
    sizes = [3, 2, 1, 1, 4, 9]
    tasks = [asyncio.ensure_future(b.submit(i, size=s)) for i, s in enumerate(sizes)]
    await asyncio.sleep(0.02)
    model.gate.set()
    await asyncio.gather(first, *tasks)
    # greedy in arrival order, never over 4 pairs unless one item alone is bigger
    assert model.seen == [[100], [0], [1, 2, 3], [4], [5]]
    assert rec.batches == [1, 3, 4, 4, 9]


async def test_flush_after_max_wait_with_a_lone_item(make) -> None:
    factory, _, _ = make
    model = FakeModel()
    b = factory(model, max_batch=8, max_wait_s=0.1)
    t0 = time.perf_counter()
    out = await b.submit(7)
    elapsed = time.perf_counter() - t0
    assert out.value == 14
    assert 0.09 <= elapsed < 5
    assert out.queued_s >= 0.09


async def test_expired_items_never_reach_the_model(make) -> None:
    factory, rec, _ = make
    model = FakeModel()
    model.gate.clear()
    b = factory(model)
    running = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.05)
    with pytest.raises(DeadlineExceeded):
        await b.submit(2, timeout_s=0.05)
    assert b.depth == 0  # dropped from the queue at once
    model.gate.set()
    assert (await running).value == 2
    assert 2 not in model.processed
    assert rec.rejections == ["deadline"]


async def test_deadline_during_inference_answers_at_once(make) -> None:
    factory, rec, _ = make
    model = FakeModel(delay_s=0.5)
    b = factory(model, max_wait_s=0)
    t0 = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        await b.submit(3, timeout_s=0.1)
    assert time.perf_counter() - t0 < 0.4
    assert rec.rejections == ["deadline"]
    assert (await b.submit(4)).value == 8  # the late result was discarded, the batcher still works


async def test_cancelled_items_are_skipped_and_counted(make) -> None:
    factory, rec, _ = make
    model = FakeModel()
    model.gate.clear()
    b = factory(model)
    running = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.05)
    gone = asyncio.ensure_future(b.submit(2))
    kept = asyncio.ensure_future(b.submit(3))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0.01)
    model.gate.set()
    assert (await running).value == 2
    assert (await kept).value == 6
    assert gone.cancelled()
    assert 2 not in model.processed
    assert rec.rejections == ["cancelled"]


async def test_exception_fails_only_its_batch(make) -> None:
    factory, _, _ = make
    model = FakeModel()
    model.gate.clear()
    b = factory(model, max_batch=2)
    blocker = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.05)
    bad = [asyncio.ensure_future(b.submit(v)) for v in (-1, 5)]  # one batch of 2, poisoned
    good = [asyncio.ensure_future(b.submit(v)) for v in (6, 7)]  # the next batch
    await asyncio.sleep(0.01)
    model.gate.set()
    await blocker
    for t in bad:
        with pytest.raises(RuntimeError, match="negative payload"):
            await t
    assert [(await t).value for t in good] == [12, 14]
    assert model.seen[1:] == [[-1, 5], [6, 7]]


class PickyModel(FakeModel):
    """Refuses odd payloads one by one (an ``Exception`` in place of the result), like a query whose
    image will not decode, and doubles the rest."""

    def __call__(self, payloads: list[int]) -> list[int | Exception]:  # type: ignore[override]
        self.seen.append(list(payloads))
        return [ValueError(f"odd {p}") if p % 2 else 2 * p for p in payloads]


async def test_an_item_refused_by_process_fails_alone_and_never_marks_the_device_failing(
    make,
) -> None:
    factory, _, _ = make
    model = PickyModel()
    b = factory(model, max_wait_s=0.05, max_batch=4)
    out = await asyncio.gather(*(b.submit(v) for v in (1, 2, 3, 4)), return_exceptions=True)
    assert any(len(batch) > 1 for batch in model.seen)  # refused items shared a batch with others
    assert [str(o) if isinstance(o, ValueError) else o.value for o in out] == [
        "odd 1",
        4,
        "odd 3",
        8,
    ]
    for _ in range(5):  # batches of nothing but refused items: the inputs' fault, not the device's
        with pytest.raises(ValueError, match="odd 5"):
            await b.submit(5)
    assert not b.failing


async def test_full_queue_is_refused_with_retry_after(make) -> None:
    factory, rec, _ = make
    model = FakeModel()
    model.gate.clear()
    b = factory(model, queue_size=3, max_batch=8)
    running = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.05)
    queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    assert b.depth == 3
    with pytest.raises(Overloaded) as info:
        await b.submit(4)
    assert info.value.retry_after_s >= 1
    with pytest.raises(Overloaded):
        await b.submit(5, size=2)
    assert rec.rejections == ["overloaded", "overloaded"]
    model.gate.set()
    await asyncio.gather(running, *queued)
    assert (await b.submit(6, size=3)).value == 12  # room again once drained


async def test_every_future_resolved_exactly_once_under_churn(make) -> None:
    factory, rec, _ = make
    model = FakeModel(delay_s=0.003)
    b = factory(model, max_batch=4, max_wait_s=0.002, queue_size=1000)
    rng = random.Random(0)
    tasks = [
        asyncio.ensure_future(b.submit(i, timeout_s=rng.choice([None, 0.001, 0.02, 0.2])))
        for i in range(200)
    ]
    await asyncio.sleep(0)  # every task has submitted its item
    for t in rng.sample(tasks, 30):
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    late = [r for r in results if isinstance(r, DeadlineExceeded)]
    cancelled = [r for r in results if isinstance(r, asyncio.CancelledError)]
    assert len(ok) + len(late) + len(cancelled) == 200
    assert len(cancelled) == 30 and ok and late
    assert all(r.value % 2 == 0 for r in ok)
    await asyncio.sleep(0.05)
    assert len(rec.rejections) == len(late) + len(cancelled)
    assert b.depth == 0 and b.alive
    assert len(set(model.processed)) == len(model.processed)  # nothing ran twice


async def test_close_drains_queued_work_then_refuses(make) -> None:
    factory, _, _ = make
    model = FakeModel(delay_s=0.01)
    b = factory(model, max_batch=2)
    tasks = [asyncio.ensure_future(b.submit(i)) for i in range(6)]
    await asyncio.sleep(0)
    await b.close(timeout_s=5)
    assert [t.result().value for t in tasks] == [0, 2, 4, 6, 8, 10]
    assert not b.alive
    with pytest.raises(Draining):
        await b.submit(1)


async def test_stopped_worker_fails_fast(make) -> None:
    factory, _, worker = make
    b = factory(FakeModel())
    worker.stop(timeout_s=5)
    assert not worker.alive and not b.alive
    with pytest.raises(WorkerStopped):
        await b.submit(1)


# -- step jobs ---------------------------------------------------------------------------------


def fake_attack(
    model: FakeModel, steps: int, step_s: float, closed: list[str]
) -> Generator[int, None, str]:
    """A job like a PGD loop: each ``next()`` holds the device for ``step_s``; returns a summary."""
    try:
        for k in range(steps):
            time.sleep(step_s)
            model.events.append("step")
            yield k
        return f"done after {steps} steps"
    finally:
        closed.append(threading.current_thread().name)


async def test_step_job_returns_its_result_and_lets_batches_in(make) -> None:
    factory, rec, worker = make
    model = FakeModel()
    b = factory(model, max_wait_s=0.001)
    jobs = JobRunner(worker, max_jobs=2, observer=rec)
    closed: list[str] = []
    job = asyncio.ensure_future(jobs.run(fake_attack(model, 30, 0.01, closed)))
    await asyncio.sleep(0.03)
    waits = []
    for i in range(5):
        t0 = time.perf_counter()
        assert (await b.submit(i)).value == 2 * i
        waits.append(time.perf_counter() - t0)
        await asyncio.sleep(0.02)
    out = await job
    assert out.value == "done after 30 steps"
    assert out.device_s >= 0.3 - 1e-3
    assert rec.steps == 31  # 30 yields and the step that returns
    assert max(waits) < 0.25  # each batch waited at most about one step, not for the 0.3 s job
    first, last = (
        model.events.index("batch"),
        len(model.events) - 1 - model.events[::-1].index("batch"),
    )
    assert "step" in model.events[:first] and "step" in model.events[last:]  # interleaved
    assert closed == ["test-device"]


async def test_step_jobs_are_bounded(make) -> None:
    _, rec, worker = make
    model = FakeModel()
    jobs = JobRunner(worker, max_jobs=2, observer=rec)
    closed: list[str] = []
    running = [asyncio.ensure_future(jobs.run(fake_attack(model, 10, 0.005, closed))) for _ in "ab"]
    await asyncio.sleep(0.01)
    assert jobs.active == 2
    with pytest.raises(Overloaded):
        await jobs.run(fake_attack(model, 1, 0.0, closed))
    assert [r.value for r in await asyncio.gather(*running)] == ["done after 10 steps"] * 2
    assert jobs.active == 0
    assert rec.rejections == ["jobs_full"]
    assert (await jobs.run(fake_attack(model, 1, 0.0, closed))).value == "done after 1 steps"


async def test_step_job_deadline_closes_the_job_on_the_device_thread(make) -> None:
    _, rec, worker = make
    model = FakeModel()
    jobs = JobRunner(worker, max_jobs=1, observer=rec)
    closed: list[str] = []
    with pytest.raises(DeadlineExceeded):
        await jobs.run(fake_attack(model, 1000, 0.01, closed), timeout_s=0.1)
    await asyncio.sleep(0.05)
    assert closed == ["test-device"]
    assert model.events.count("step") < 50
    assert rec.rejections == ["deadline"]
    assert jobs.active == 0


async def test_step_job_exception_reaches_the_caller(make) -> None:
    _, _, worker = make
    jobs = JobRunner(worker, max_jobs=1)

    def broken() -> Generator[None, None, None]:
        yield
        raise ValueError("step 2 failed")

    with pytest.raises(ValueError, match="step 2 failed"):
        await jobs.run(broken())
    assert jobs.active == 0
