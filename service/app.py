"""`create_app(settings)`: the FastAPI application. The engine is opened and warmed in the background at startup;
`/healthz` answers at once, `/readyz` and the inference routes only once the engine is warm."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import cv2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from service.batcher import Batcher
from service.bundle import load_bundle
from service.engines import open_engine, warm_up
from service.engines.base import Engine, EngineOptions
from service.errors import ServiceError
from service.metrics import ServiceMetrics
from service.middleware import BodyLimitMiddleware, MetricsMiddleware, RequestIdMiddleware
from service.routes import frames, health, streams, viewer, websocket
from service.serving import InferenceService
from service.settings import Settings
from service.state import AppState
from service.streaming import StreamsApi

logger = logging.getLogger("endostream.service")


def _engine_options(settings: Settings) -> EngineOptions:
    return EngineOptions(
        device=settings.device,
        threads=settings.threads,
        precision=settings.precision,
        cuda_graphs=settings.cuda_graphs,
        max_batch=settings.max_batch,
        engine_cache=str(settings.engine_cache) if settings.engine_cache else None,
        compile=settings.compile,
    )


def build_state(settings: Settings) -> AppState:
    """Everything but the running engine: bundle checked, metrics registered, batcher and streams ready to start."""
    bundle = load_bundle(settings.bundle)
    metrics = ServiceMetrics()
    spec = bundle.manifest.input
    batches = sorted({1, settings.max_batch})

    def start_engine() -> Engine:
        engine = open_engine(bundle, settings.backend, _engine_options(settings))
        logger.info(
            "engine: %s on %s (%s); warming up at batch %s", engine.backend, engine.device, engine.precision, batches
        )
        return engine

    def warm(engine: Engine) -> None:
        warm_up(engine, spec.height, spec.width, batches=tuple(batches), runs=settings.warmup_runs)

    batcher = Batcher(
        start_engine,
        max_batch=settings.max_batch,
        max_queue_delay_s=settings.max_queue_delay_ms / 1000,
        queue_limit=settings.queue_limit,
        metrics=metrics,
        warm_up=warm,
    )
    service = InferenceService(bundle, batcher, metrics, max_pixels=settings.max_pixels)
    streams = StreamsApi(settings, service, metrics)
    return AppState(settings, bundle, metrics, batcher, service, streams)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.endostream
    state.batcher.start()
    try:
        yield
    finally:
        state.streams_api.close()
        state.batcher.stop()
        state.service.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for `settings` (default: from `ENDOSTREAM_*` environment variables)."""
    settings = settings or Settings()
    cv2.setNumThreads(1)  # frames are processed in parallel by the pool; nested OpenCV threads only add contention
    state = build_state(settings)
    manifest = state.bundle.manifest
    app = FastAPI(
        title="endostream",
        version=state.bundle.version,
        summary=f"Surgical activity and segmentation for endoscope frames: {manifest.name} ({manifest.family})",
        description="Assistive only: results support, never replace, the surgeon's judgement.",
        lifespan=lifespan,
    )
    app.state.endostream = state
    app.include_router(health.router)
    app.include_router(frames.router)
    app.include_router(websocket.router)
    app.include_router(streams.router)
    app.include_router(viewer.router)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, err: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(err.retry_after)} if hasattr(err, "retry_after") else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or str(first["loc"][0])
        body = {"error": {"code": "invalid_parameter", "message": f"{param}: {first['msg']}", "param": param}}
        if "input" in first and isinstance(first["input"], str | int | float):
            body["error"]["value"] = first["input"]
        return JSONResponse(body, status_code=400)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        )
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes, metrics=state.metrics)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)
    return app


def static_dir() -> Path:
    return Path(__file__).parent / "static"
