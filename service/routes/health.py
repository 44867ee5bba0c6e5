"""Liveness, readiness, the served model, and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import Authorized, State, require_token
from service.schemas import ErrorBody, Health

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "the engine failed to start: restart or fix the bundle"}},
    summary="Liveness: the process answers and its engine has not failed",
)
async def healthz(state: State) -> Response:
    # A failed engine never becomes ready: report it here, so a liveness probe restarts the process (a supervisor
    # that only watches /readyz would keep it forever). `endostream serve` exits in that case anyway.
    error = state.batcher.startup_error
    if error is not None:
        body = Health(status="failed", detail=f"engine failed to start: {type(error).__name__}: {error}"[:500])
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(Health(status="ok").model_dump())


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "engine loading, warming up, or failed"}},
    summary="Readiness: the engine is loaded and warmed up",
)
async def readyz(state: State) -> Response:
    batcher = state.batcher
    if batcher.ready:
        return JSONResponse(Health(status="ready").model_dump())
    if batcher.startup_error is not None:
        body = Health(status="failed", detail=f"{type(batcher.startup_error).__name__}: {batcher.startup_error}")
    else:
        body = Health(status="starting", detail="loading and warming up the engine")
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "2"})


@router.get(
    "/model",
    dependencies=[Authorized],
    responses={401: {"model": ErrorBody}},
    summary="The bundle manifest and what runs it",
)
async def model(state: State) -> dict[str, Any]:
    engine = state.batcher.engine
    return {
        "manifest": state.bundle.raw_manifest,
        "version": state.bundle.version,
        "engine": None
        if engine is None
        else {
            "backend": engine.backend,
            "device": engine.device,
            "precision": engine.precision,
            "decoder": state.service.decoder.device,
            "onnxruntime_spin_wait": getattr(engine, "spin_wait", None),
        },
        "batching": {
            "max_batch": state.batcher.max_batch,
            "max_queue_delay_ms": state.batcher.max_queue_delay_s * 1000,
            "queue_limit": state.batcher.queue_limit,
        },
        "ready": state.batcher.ready,
        # the temporal head that runs (None: the bundle has none, or ENDOSTREAM_TEMPORAL=0)
        "temporal": None if state.service.temporal is None else state.service.temporal.describe(),
    }


@router.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
async def metrics(request: Request, state: State) -> Response:
    if not state.settings.metrics_public:
        await require_token(request)
    state.streams_api.refresh_gauges()
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
