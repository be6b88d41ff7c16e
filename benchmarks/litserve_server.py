"""The LitServe peer: the batching server a user would write around the model with PyPI ``litserve``.

Same model (``lpips-alex`` from the store), same decode and resize (``app.imaging.load_tensor`` at
``RLPIPS_RESOLUTION``), same payload as the service (``POST /distance``, multipart fields ``reference`` and
``candidate``, one pair) and LitServe's own batching with the service's batch settings:
``max_batch_size = RLPIPS_MAX_BATCH_PAIRS``, ``batch_timeout = RLPIPS_MAX_WAIT_MS / 1000``. Readiness is
LitServe's ``GET /health`` (200 once every inference worker finished ``setup``).

How LitServe 0.2.19 runs it (read from its source): the launching process starts a
``multiprocessing.Manager`` process (the request queue and the response queues live there), one *spawned*
inference worker process per device × ``workers_per_device`` (CPU: one device, so 1 by default) and one
*forked* uvicorn process per API server (default: as many as inference workers). The uvicorn process
parses the multipart body (``await request.form()``) and puts the ``FormData`` (pickled ``UploadFile``
objects holding the bytes) on the manager queue. Everything else runs in the inference worker, in one
thread, one batch after another: collect up to ``max_batch_size`` requests until ``batch_timeout`` has
passed since the first poll (it waits the whole timeout unless the batch fills), then ``decode_request``
for each request *serially* (JPEG decode + resize here), ``batch``, ``predict``, ``unbatch``,
``encode_response``. Decoding is therefore not overlapped with inference.

Threads: torch's default intra-op threads in the worker (as the naive peer), unless ``RLPIPS_TORCH_THREADS``
is set. ``RLPIPS_LITSERVE_WORKERS`` (default 1, LitServe's default) sets ``workers_per_device``;
``RLPIPS_LITSERVE_FAST_QUEUE=1`` turns on LitServe's ZeroMQ response transport (default off).

    RLPIPS_RESOLUTION=64 python -m benchmarks.litserve_server --port 8002
"""

# No ``from __future__ import annotations`` here: LitServe reads the annotation of
# ``decode_request(request)`` at run time to type its endpoint, so ``request`` stays unannotated.

import argparse
import os
import signal
import sys
from types import FrameType
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException
from starlette.datastructures import UploadFile

from app.config import Settings
from app.imaging import ImageError, load_tensor
from app.metric.lpips import LPIPS

Pair = tuple[torch.Tensor, torch.Tensor]


class DistanceAPI(ls.LitAPI):  # type: ignore[misc]
    """One pair per request; predict runs batches of ``[B, 3, R, R]`` tensors in ``[-1, 1]``."""

    def setup(self, device: str) -> None:
        settings = Settings()
        if settings.torch_threads:  # same thread setting as the service when the benchmark sets one
            torch.set_num_threads(settings.torch_threads)
        self.resolution = settings.resolution
        self.target = torch.device(device)
        self.metric: LPIPS = settings.store().load("lpips-alex", self.target)

    def decode_request(self, request, **kwargs: Any) -> Pair:  # type: ignore[no-untyped-def]
        """Multipart ``reference`` + ``candidate`` → two ``[3, R, R]`` tensors in ``[-1, 1]``."""
        return self._image(request, "reference"), self._image(request, "candidate")

    def _image(self, form: Any, field: str) -> torch.Tensor:
        upload = form.get(field)
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, f"file field {field!r} is required")
        try:
            return load_tensor(upload.file.read(), self.resolution)
        except ImageError as exc:
            raise HTTPException(400, f"{field}: {exc}") from None

    def batch(self, inputs: list[Pair]) -> Pair:
        """B pairs → ``([B, 3, R, R], [B, 3, R, R])``."""
        return torch.stack([x0 for x0, _ in inputs]), torch.stack([x1 for _, x1 in inputs])

    def predict(self, x: Pair, **kwargs: Any) -> list[float]:
        """Distances ``[B]`` (non-negative floats) for one batch."""
        x0, x1 = x
        with torch.inference_mode():
            out = self.metric(x0.to(self.target), x1.to(self.target))
        return [float(d) for d in out.cpu()]

    def unbatch(self, output: list[float]) -> list[float]:
        return output

    def encode_response(self, output: float, **kwargs: Any):  # type: ignore[no-untyped-def]
        return {"distance": output}


def build_server(settings: Settings) -> ls.LitServer:
    """The LitServer with the service's batch settings (``max_batch_pairs``, ``max_wait_ms``)."""
    api = DistanceAPI(
        max_batch_size=settings.max_batch_pairs,
        batch_timeout=settings.max_wait_ms / 1000,
        api_path="/distance",
    )
    return ls.LitServer(
        api,
        accelerator=settings.device,
        workers_per_device=int(os.environ.get("RLPIPS_LITSERVE_WORKERS", "1")),
        fast_queue=os.environ.get("RLPIPS_LITSERVE_FAST_QUEUE", "0") == "1",
    )


_LAUNCHER = os.getpid()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM: LitServer.run's graceful shutdown (KeyboardInterrupt stops workers and the manager).
    Forked children inherit this handler; uvicorn re-raises the signal there after its own shutdown."""
    if os.getpid() != _LAUNCHER:
        sys.exit(0)
    raise KeyboardInterrupt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--log-level", default="warning")
    args = p.parse_args()
    server = build_server(Settings())
    signal.signal(signal.SIGTERM, _interrupt)
    server.run(host=args.host, port=args.port, log_level=args.log_level, generate_client_file=False)


if __name__ == "__main__":
    main()
