"""The naive peer: the FastAPI handler most people would write around the model — no batching.

Same model (lpips-alex from the store), same decode and resize, one model call per request in FastAPI's
thread pool. Run it with uvicorn like the service:

    RLPIPS_RESOLUTION=64 uvicorn benchmarks.naive_server:create_app --factory --port 8001
"""

from __future__ import annotations

import torch
from fastapi import FastAPI, UploadFile

from app.config import Settings
from app.imaging import load_tensor


def create_app() -> FastAPI:
    settings = Settings()
    if settings.torch_threads:  # same thread setting as the service when the benchmark sets one
        torch.set_num_threads(settings.torch_threads)
    resolution = settings.resolution
    metric = settings.store().load("lpips-alex")
    app = FastAPI(title="naive LPIPS peer")

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/distance")
    def distance(reference: UploadFile, candidate: UploadFile) -> dict[str, float]:
        x0 = load_tensor(reference.file.read(), resolution)[None]
        x1 = load_tensor(candidate.file.read(), resolution)[None]
        with torch.inference_mode():
            return {"distance": float(metric(x0, x1)[0])}

    return app
