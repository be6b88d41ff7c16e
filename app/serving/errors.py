"""Why the runtime refused or dropped work. Raised by the batcher, the worker and the runtime; mapped
to HTTP statuses in :mod:`app.api.errors` (and nowhere else)."""

from __future__ import annotations


class Overloaded(Exception):
    """Admission refused: the queue (or the job slots) are full. ``retry_after_s`` is a hint (≥ 1 s)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The item waited past its deadline, before or during device work."""


class Draining(Exception):
    """The runtime is shutting down and accepts no new work."""


class WorkerStopped(Exception):
    """The device worker is not running (never started, stopped or died)."""
