"""Service settings: environment variables `ENDOSTREAM_*` (pydantic-settings), overridden by `endostream serve` flags.

Built inside `create_app()`, never at import, so tests and the CLI can pass their own values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_BUNDLE = Path("endostream-work/bundle")  # what the README's main-job command builds when missing


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything an operator can set. Units are in the names; limits protect the box from a bad client."""

    model_config = SettingsConfigDict(env_prefix="ENDOSTREAM_", extra="ignore", protected_namespaces=())

    bundle: Path = Field(DEFAULT_BUNDLE, description="bundle folder (manifest.json + model.onnx)")
    backend: Literal["auto", "tensorrt", "onnxruntime", "torch"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: str = Field("auto", description="fp32|fp16|bf16|int8 where the backend supports it")
    threads: int = Field(0, ge=0, description="engine CPU threads (0: backend default)")
    cuda_graphs: bool = True
    decode: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where JPEG frames are decoded and resized: auto = on the GPU when the engine runs there"
    )
    ort_spin_wait: bool = Field(
        False, description="ONNX Runtime threads spin between calls (faster for one client, slower under load)"
    )
    engine_cache: Path | None = Field(None, description="folder for TensorRT engines (default: the bundle)")
    max_batch: int = Field(8, ge=1, le=256, description="largest dynamic batch; 1 disables batching")
    max_queue_delay_ms: float = Field(2.0, ge=0, le=1000, description="longest wait for a batch to fill")
    queue_limit: int = Field(64, ge=1, description="frames decoding or waiting for the engine before 503")
    max_concurrent_requests: int = Field(
        16, ge=1, description="most frame requests in progress at once; beyond the current limit 503 before the body"
    )
    admission_latency_tolerance: float = Field(
        1.5,
        ge=0,
        description="the admission limit shrinks while frames take longer than this x the no-load latency "
        "(service/admission.py); 0 keeps it fixed at ENDOSTREAM_MAX_CONCURRENT_REQUESTS",
    )
    max_queue_wait_ms: float | None = Field(
        100.0, gt=0, description="503 while the oldest queued frame has waited longer than this (None: no limit)"
    )
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    body_read_timeout_s: float = Field(10.0, gt=0, description="a request body must arrive within this (408)")
    max_inflight_body_bytes: int = Field(
        128 * 1024 * 1024, ge=1024, description="request bodies held at once, all requests together (503 beyond)"
    )
    max_pixels: int = Field(4096 * 4096, ge=64 * 64, description="width x height limit of a decoded frame")
    max_frames_per_request: int = Field(64, ge=1, description="multipart parts per /infer request")
    stream_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="URL prefixes stream sources must start with; empty: no streams allowed"
    )
    stream_open_timeout_s: float = Field(5.0, gt=0)
    stream_read_timeout_s: float = Field(5.0, gt=0)
    stream_backoff_max_s: float = Field(
        1.0,
        gt=0,
        description="longest wait between reconnect attempts to a lost camera (full jitter below it); a restarted "
        "camera is back within this plus its open time",
    )
    stream_backend: Literal["pyav", "opencv"] = Field(
        "pyav",
        description="stream decoder; OpenCV serialises every open in the process, so one dead camera would hold "
        "back all other streams' opens and reconnects for its whole open timeout",
    )
    api_token: str | None = Field(None, description="when set, routes need `Authorization: Bearer <token>`")
    metrics_public: bool = Field(True, description="serve /metrics without the token (scrapers on the box)")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    warmup_runs: int = Field(3, ge=0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_streams: int = Field(
        16,
        ge=1,
        le=256,
        description="live sources read at once; each holds a decoder thread and a waiting thread of its own, so "
        "streams never queue behind each other (beyond it: 429)",
    )

    temporal: bool = Field(
        True, description="run the bundle's temporal head when it has one (0: results carry no activity_temporal)"
    )
    temporal_reset_s: float = Field(
        10.0, gt=0, description="a gap longer than this between frames of one source starts its temporal state afresh"
    )
    temporal_session_ttl_s: float = Field(
        60.0, gt=0, description="an HTTP session's temporal state is dropped after this long without a frame"
    )
    temporal_max_sessions: int = Field(
        1024, ge=1, description="HTTP sessions' temporal states kept at once (least recently used dropped beyond it)"
    )

    @field_validator("stream_allowlist", "cors_origins", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("api_token")
    @classmethod
    def _token_strength(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == "":
            return None
        if value is not None and len(value) < 16:
            raise ValueError("ENDOSTREAM_API_TOKEN must be at least 16 characters (try `openssl rand -hex 24`)")
        return value

    @field_validator("admission_latency_tolerance")
    @classmethod
    def _tolerance(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError(
                f"ENDOSTREAM_ADMISSION_LATENCY_TOLERANCE={value} must be > 1 (a multiple of the no-load latency) or 0 "
                "(a fixed limit)"
            )
        return value

    @model_validator(mode="after")
    def _cors_with_token(self) -> Settings:
        if "*" in self.cors_origins and self.api_token is None and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                "ENDOSTREAM_CORS_ORIGINS='*' on a non-loopback host needs ENDOSTREAM_API_TOKEN: any web page could "
                "drive the service; list the viewer's origin instead"
            )
        return self

    compile: Literal["off", "default", "max-autotune"] = Field(
        "off", description="torch backend: torch.compile the program (compiles at warm-up: seconds to minutes)"
    )
