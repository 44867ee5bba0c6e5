"""`create_app(settings)`: the FastAPI application. The engine is opened and warmed in the background at startup;
`/healthz` answers at once, `/readyz` and the inference routes only once the engine is warm."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import cv2
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.admission import AdaptiveLimit
from service.batcher import Batcher
from service.bundle import load_bundle
from service.decoding import make_decoder
from service.deps import websocket_authorized
from service.engines import open_engine, warm_up
from service.engines.base import Engine, EngineOptions
from service.errors import ServiceError
from service.lifecycle import watch_engine
from service.metrics import ServiceMetrics
from service.middleware import (
    BodyLimitMiddleware,
    FrameAdmissionMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
)
from service.routes import docs, frames, health, streams, viewer, websocket
from service.serving import InferenceService
from service.settings import Settings
from service.state import AppState
from service.streaming import StreamsApi
from service.temporal import SessionStore, open_tracker

logger = logging.getLogger("endostream.service")


def _engine_options(settings: Settings) -> EngineOptions:
    return EngineOptions(
        device=settings.device,
        threads=settings.threads,
        precision=settings.precision,
        cuda_graphs=settings.cuda_graphs,
        max_batch=settings.max_batch,
        engine_cache=str(settings.engine_cache) if settings.engine_cache else None,
        spin_wait=settings.ort_spin_wait,
        compile=settings.compile,
    )


def build_state(settings: Settings) -> AppState:
    """Everything but the running engine: bundle checked, metrics registered, batcher and streams ready to start."""
    bundle = load_bundle(settings.bundle)
    metrics = ServiceMetrics()
    spec = bundle.manifest.input
    tracker = open_tracker(bundle, enabled=settings.temporal, reset_after_s=settings.temporal_reset_s, metrics=metrics)
    batches = sorted({1, settings.max_batch})

    def start_engine() -> Engine:
        engine = open_engine(bundle, settings.backend, _engine_options(settings))
        logger.info(
            "engine: %s on %s (%s); warming up at batch %s", engine.backend, engine.device, engine.precision, batches
        )
        service.use_decoder(
            make_decoder(
                settings.decode,
                engine_backend=engine.backend,
                engine_device=engine.device,
                height=spec.height,
                width=spec.width,
                max_pixels=settings.max_pixels,
            )
        )
        return engine

    def warm(engine: Engine) -> None:
        warm_up(engine, spec.height, spec.width, batches=tuple(batches), runs=settings.warmup_runs)

    batcher = Batcher(
        start_engine,
        max_batch=settings.max_batch,
        max_queue_delay_s=settings.max_queue_delay_ms / 1000,
        queue_limit=settings.queue_limit,
        max_queue_wait_s=settings.max_queue_wait_ms / 1000 if settings.max_queue_wait_ms else None,
        metrics=metrics,
        warm_up=warm,
    )
    sessions = None
    if tracker is not None:
        sessions = SessionStore(
            ttl_s=settings.temporal_session_ttl_s, max_sessions=settings.temporal_max_sessions, metrics=metrics
        )
    service = InferenceService(
        bundle, batcher, metrics, max_pixels=settings.max_pixels, temporal=tracker, sessions=sessions
    )
    streams = StreamsApi(settings, service, metrics)
    return AppState(settings, bundle, metrics, batcher, service, streams)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.endostream
    state.batcher.start()
    # `on_fatal` is read when the engine fails, not now: `endostream serve` sets it after building the app
    watcher = asyncio.create_task(watch_engine(state.batcher, lambda: state.on_fatal() if state.on_fatal else None))
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
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
        # with a token, the schema and its pages are served by routes/docs.py behind it instead
        openapi_url=None if settings.api_token else "/openapi.json",
        docs_url=None if settings.api_token else "/docs",
        redoc_url=None if settings.api_token else "/redoc",
    )
    app.state.endostream = state
    app.include_router(health.router)
    app.include_router(frames.router)
    app.include_router(websocket.router)
    app.include_router(streams.router)
    app.include_router(viewer.router)
    if settings.api_token:
        app.include_router(docs.router)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, err: ServiceError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        # Starlette's own errors (unknown route, wrong method, malformed multipart) in the one error shape
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        body = {"error": {"code": code, "message": str(err.detail)}}
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(WebSocketRequestValidationError)
    async def websocket_validation_error(websocket: WebSocket, err: WebSocketRequestValidationError) -> None:
        # FastAPI closes before the handshake, which clients see as HTTP 403, the same as a bad token. An authorized
        # client instead gets the handshake, the error body naming the parameter, then close 1008.
        if not websocket_authorized(websocket):
            await websocket.close(code=1008, reason="unauthorized: send Authorization: Bearer or ?token=")
            return
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or str(first["loc"][0])
        await websocket.accept()
        await websocket.send_json(
            {"error": {"code": "invalid_parameter", "message": f"{param}: {first['msg']}", "param": param}}
        )
        await websocket.close(code=1008, reason=f"invalid parameter {param}"[:120])

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
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-Session-Id", "X-Frame-Time"],
        )
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_upload_bytes,
        metrics=state.metrics,
        read_timeout_s=settings.body_read_timeout_s,
        inflight_limit=max(settings.max_inflight_body_bytes, settings.max_upload_bytes),
    )
    limit = AdaptiveLimit(settings.max_concurrent_requests, tolerance=settings.admission_latency_tolerance)
    app.add_middleware(FrameAdmissionMiddleware, limit=limit, metrics=state.metrics)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)
    return app


def static_dir() -> Path:
    return Path(__file__).parent / "static"
