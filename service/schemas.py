"""Request and response models (pydantic); the OpenAPI docs take their examples from here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MaskFormat = Literal["png", "rle", "raw", "none"]
MaskSize = Literal["model", "frame"]


class FrameInfo(BaseModel):
    id: int = Field(description="frame number within the request, WebSocket session or stream (0-based)")
    timestamp: float | None = Field(None, description="source timestamp in seconds (stream PTS), when known")
    captured_at: float | None = Field(None, description="Unix time the stream reader decoded the frame")
    width: int
    height: int
    dropped_before: int = Field(0, description="frames skipped since the previous result to stay live")
    frame_jpeg: str | None = Field(None, description="the source frame, base64 JPEG (streams with include_frame)")


class ActivityResult(BaseModel):
    task: str
    label: str
    index: int
    confidence: float
    probabilities: dict[str, float]


class TemporalActivityResult(BaseModel):
    """The temporal head's answer for a frame of a stream, WebSocket connection or HTTP session (README "Temporal
    activity in results"): the same classes as `activity`, from the frames of that source up to this one."""

    task: str
    label: str
    index: int
    confidence: float
    probabilities: dict[str, float]
    method: str = Field(description="what the bundle's head is: tcn, gru, ema, hmm")
    frame_interval_s: float = Field(description="source time per head step")
    context_frames: int = Field(description="head steps behind this answer since the state was fresh, at most the "
                                "head's receptive field")  # fmt: skip
    steps: int = Field(description="head steps since the state was fresh (held steps included)")
    stepped: int = Field(
        description="head steps this frame caused: 0 when it came less than one interval after the last step (the "
        "answer is the latest one), k when it came k intervals later"
    )
    held: int = Field(description="of those, steps fed the previous frame's input (frames missing in the gap)")
    reset: bool = Field(description="the state started fresh at this frame (first frame, long gap, new clock)")


class ClassPresence(BaseModel):
    index: int
    name: str
    fraction: float = Field(description="share of the frame's pixels")


class RunLengths(BaseModel):
    values: list[int] = Field(description="class index of each run, row-major")
    lengths: list[int] = Field(description="pixels in each run")


class SegmentationResult(BaseModel):
    task: str
    height: int = Field(description="rows of the mask: the model's grid, or the frame's height with mask_size=frame")
    width: int = Field(description="columns of the mask")
    mask_size: MaskSize = Field(
        description="model: the class map at the model's input grid, covering the whole frame (upscale it with "
        "nearest-neighbour sampling at pixel centres to get the frame-size mask); frame: already at the frame's size"
    )
    classes: list[ClassPresence] = Field(description="classes present, largest first (shares of the frame's pixels)")
    mask_format: MaskFormat
    mask: str | RunLengths | None = Field(
        None,
        description="png: base64 single-channel PNG of class indices; rle: runs; raw: the bytes follow the JSON in "
        "the compact response; none",
    )


class Latency(BaseModel):
    decode: float
    preprocess: float
    queue: float
    infer: float
    postprocess: float
    encode: float
    unattributed: float = Field(description="total minus the stages: thread hand-offs, waiting for a worker")
    total: float
    batch_size: int = Field(description="frames in the engine call that included this one")
    temporal: float | None = Field(
        None, description="part of postprocess: the temporal head's steps for this frame (present when it ran)"
    )
    decoder: str = Field(description="where the frame was decoded and resized: cpu, or the GPU (e.g. cuda:0)")


class ModelRef(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    family: str
    version: str
    backend: str
    device: str
    precision: str


class InferResult(BaseModel):
    """One processed frame."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "frame": {"id": 0, "timestamp": None, "captured_at": None, "width": 1920, "height": 1080},
                    "activity": {
                        "task": "activity",
                        "label": "cutting",
                        "index": 2,
                        "confidence": 0.91,
                        "probabilities": {"idle": 0.02, "grasping": 0.04, "cutting": 0.91, "suction": 0.03},
                    },
                    "segmentation": {
                        "task": "segmentation",
                        "height": 96,
                        "width": 96,
                        "mask_size": "model",
                        "classes": [{"index": 0, "name": "background", "fraction": 0.81}],
                        "mask_format": "png",
                        "mask": "iVBORw0KGgo...",
                    },
                    "latency_ms": {
                        "decode": 3.1,
                        "preprocess": 0.2,
                        "queue": 0.1,
                        "infer": 6.3,
                        "postprocess": 0.05,
                        "encode": 0.04,
                        "unattributed": 0.2,
                        "total": 10.0,
                        "batch_size": 1,
                        "decoder": "cpu",
                    },
                    "model": {
                        "name": "tiny",
                        "family": "endoarss",
                        "version": "3f2a9c1d0b7e",
                        "backend": "onnxruntime",
                        "device": "cpu",
                        "precision": "fp32",
                    },
                }
            ]
        }
    )

    frame: FrameInfo
    activity: ActivityResult | None = None
    activity_temporal: TemporalActivityResult | None = Field(
        None,
        description="present when the bundle has a temporal head and the frame belongs to a stream, a WebSocket "
        "connection or an HTTP session (X-Session-Id or ?session=) and activity is returned",
    )
    segmentation: SegmentationResult | None = None
    latency_ms: Latency
    model: ModelRef


class StreamRequest(BaseModel):
    """Read a live source and stream back one NDJSON result per processed frame."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"source": "rtsp://127.0.0.1:8554/endoscope", "max_seconds": 30}]},
    )

    source: str = Field(description="rtsp://, rtsps://, http(s):// (MJPEG) or file: URL matching the allowlist")
    max_frames: int | None = Field(None, ge=1, description="stop after this many results")
    max_seconds: float | None = Field(None, gt=0, description="stop after this long")
    fps: float | None = Field(None, gt=0, description="process at most this many frames per second")
    include_frame: bool = Field(False, description="add the source frame (JPEG, base64) to each result, for viewers")


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None
    value: str | int | float | bool | None = None


class ErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": {"code": "not_an_image", "message": "the body (12 bytes) is not a JPEG, PNG or BMP"}}
            ]
        }
    )

    error: ErrorDetail


class StreamInfo(BaseModel):
    id: str
    url: str
    state: str
    fps: float
    frames_read: int
    frames_processed: int
    frames_dropped: int
    reconnects: int
    last_error: str | None = None
    age_s: float = Field(description="seconds since the stream was opened")
    last_frame_age_s: float | None = Field(None, description="seconds since the reader decoded its newest frame")


class Health(BaseModel):
    status: Literal["ok", "ready", "starting", "failed"]
    detail: str | None = None
