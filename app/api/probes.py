"""``GET /models``, ``/healthz``, ``/readyz`` and ``/metrics``: what the service holds and how it is."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.bodies import ERROR_RESPONSES
from app.api.deps import current_runtime, ready_runtime
from app.api.errors import ApiError, error_response
from app.api.schemas import ErrorBody, ModelFile, ModelInfo, ModelsResponse, Status
from app.metric.store import ModelStore
from app.telemetry import Telemetry

router = APIRouter()


def describe_file(store: ModelStore, file_id: str) -> ModelFile:
    """One manifest file: the store's verified hash, or the manifest's listed sha256 when no verified
    copy is present."""
    entry = store.manifest.files[file_id]
    st = store.status(file_id)
    if st.path is None:
        listed = next((d.value for d in entry.digests if d.kind == "sha256"), None)
        return ModelFile(path=entry.filename, sha256=listed, available=False)
    return ModelFile(path=st.path.name, sha256=st.sha256, available=True)


def describe_models(store: ModelStore, loaded: set[str], default: str) -> ModelsResponse:
    """Every model of the store (exactly one ``default``)."""
    return ModelsResponse(
        models=[
            ModelInfo(
                name=name,
                trunk=m.trunk.arch,
                variant=m.variant,
                source=m.source,
                files=[describe_file(store, f) for f in store.files_of(name)],
                threshold=m.threshold,
                calibration=m.calibration,
                loaded=name in loaded,
                default=name == default,
            )
            for name, m in store.manifest.models.items()
        ]
    )


@router.get(
    "/models",
    response_model=ModelsResponse,
    responses={401: ERROR_RESPONSES[401]},
    summary="every model in the store",
)
async def models(request: Request) -> ModelsResponse:
    store: ModelStore = request.app.state.store
    rt = current_runtime(request)
    loaded = rt.loaded if rt is not None else set()
    default = rt.default_model if rt is not None else request.app.state.default_model
    return await asyncio.to_thread(describe_models, store, loaded, default)


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", response_model=Status, summary="liveness: 200 while the process runs")
async def healthz() -> Status:
    return Status(status="ok")


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=Status,
    responses={503: {"model": ErrorBody}},
    summary="readiness: 200 once every model is loaded and warmed and the worker is alive",
)
async def readyz(request: Request) -> Response:
    """503 also while the device fails batch after batch (work is still taken: a success, or the probe
    sent from here, brings readiness back)."""
    try:
        rt = ready_runtime(request)
    except ApiError as exc:
        return error_response(exc.code, exc.message)
    if rt.batcher.failing:
        rt.probe()
        return error_response(
            "not_ready", f"the last {rt.batcher.failures} device batches failed; see the log"
        )
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
    summary="Prometheus metrics (text format)",
)
async def metrics(request: Request) -> Response:
    telemetry: Telemetry = request.app.state.telemetry
    return Response(telemetry.render(), media_type=telemetry.content_type)
