"""`POST /infer`: one frame (raw body), a batch (multipart), or a live source (JSON -> NDJSON stream).

Thin: parse, call the service, choose the response type. The logic lives in service/serving.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from service.deps import Authorized, Service, State
from service.errors import BadInput, UnsupportedMediaType
from service.postprocess import RAW_MEDIA_TYPE, InferOptions, Outcome
from service.schemas import ErrorBody, InferResult, MaskFormat, MaskSize, StreamRequest
from service.temporal import parse_frame_time, parse_session

router = APIRouter(tags=["inference"], dependencies=[Authorized])

IMAGE_TYPES = ("image/jpeg", "image/png", "image/bmp")
ERRORS = {
    400: {"model": ErrorBody, "description": "empty, corrupt or oversized frame; bad query"},
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    403: {"model": ErrorBody, "description": "stream source not in ENDOSTREAM_STREAM_ALLOWLIST"},
    413: {"model": ErrorBody, "description": "body over ENDOSTREAM_MAX_UPLOAD_BYTES"},
    415: {"model": ErrorBody, "description": "unsupported Content-Type"},
    503: {"model": ErrorBody, "description": "engine not ready, or queue full (see Retry-After)"},
}
OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/bmp": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "frame": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
                    },
                    "required": ["frame"],
                }
            },
            "application/json": {
                "schema": {"$ref": "#/components/schemas/StreamRequest"},
                "examples": {
                    "rtsp": {"value": {"source": "rtsp://127.0.0.1:8554/endoscope", "max_seconds": 30}},
                    "file": {"value": {"source": "file:/data/clips/case01.mp4", "max_frames": 100, "fps": 10}},
                },
            },
        },
    },
    "responses": {
        "200": {
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}, "example": '{"frame": {"id": 0, ...}}\n'},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                RAW_MEDIA_TYPE: {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "mask=raw: uint32 little-endian N, N bytes of JSON result, then the class map's "
                    "height x width bytes (row-major)",
                },
            }
        }
    },
}


def _options(
    service: Service, request: Request, mask: MaskFormat, mask_size: MaskSize, tasks: str | None, overlay: bool
) -> InferOptions:
    accept = request.headers.get("accept", "")
    image = "png" if overlay or "image/png" in accept else "jpeg" if "image/jpeg" in accept else None
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    return InferOptions(mask=mask, mask_size=mask_size, tasks=service.validate_tasks(names), overlay=image)


def _json(body: bytes) -> Response:
    """A JSON body serialised by orjson already: no second validation or encoding pass."""
    return Response(body, media_type="application/json")


def _single_frame_only(options: InferOptions, what: str) -> None:
    if options.mask == "raw":
        raise BadInput(
            "raw_mask_single_frame",
            f"mask=raw (the compact binary response) carries one frame; {what} answer JSON: use mask=png or rle",
            param="mask",
            value="raw",
        )


@router.post(
    "/infer",
    # one frame: one result; a multipart batch: one result per `frame` part, in order (documentation only: the
    # route returns the orjson body it built, never re-validated)
    response_model=InferResult | list[InferResult],
    responses=ERRORS,
    openapi_extra=OPENAPI_BODY,
    summary="Infer activity and segmentation for frames or a live source",
)
async def infer(
    request: Request,
    service: Service,
    state: State,
    mask: Annotated[
        MaskFormat, Query(description="mask encoding: png|rle in the JSON; raw: the compact binary response")
    ] = "png",
    mask_size: Annotated[
        MaskSize, Query(description="model: the class map at the model's grid (default); frame: at the frame's size")
    ] = "model",
    tasks: Annotated[str | None, Query(description="comma-separated tasks to return (default: all)")] = None,
    overlay: Annotated[bool, Query(description="return the frame with the mask and label drawn (PNG)")] = False,
    session: Annotated[
        str | None,
        Query(
            description="temporal session id (1-64 of A-Z a-z 0-9 . _ : -): frames of one session share a temporal "
            "state and get `activity_temporal` (same as the X-Session-Id header; ignored by bundles without a "
            "temporal head)"
        ),
    ] = None,
    t: Annotated[
        str | None,
        Query(description="the frame's time in seconds within its session (same as X-Frame-Time; default: arrival)"),
    ] = None,
    x_session_id: Annotated[str | None, Header(description="temporal session id (see `session`)")] = None,
    x_frame_time: Annotated[str | None, Header(description="the frame's time in seconds (see `t`)")] = None,
) -> Response:
    options = _options(service, request, mask, mask_size, tasks, overlay)
    session_id = parse_session(_one_of("session", x_session_id, session))
    frame_time = parse_frame_time(_one_of("t", x_frame_time, t))
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if (session_id is not None or frame_time is not None) and content_type not in IMAGE_TYPES:
        raise BadInput(
            "session_single_frame",
            "a temporal session takes one frame per request, in time order; multipart batches and streams (which "
            "carry their own temporal state) take no session",
            param="session",
        )
    if content_type in IMAGE_TYPES:
        track = service.session_track(session_id, frame_time)
        outcome = await service.infer_bytes(await request.body(), options, track=track)
        if outcome.image is not None:
            return Response(outcome.image, media_type=f"image/{options.overlay}", headers=_summary(outcome.result))
        if options.mask == "raw":
            return Response(outcome.compact(), media_type=RAW_MEDIA_TYPE)
        return _json(outcome.json())
    if content_type == "multipart/form-data":
        _single_frame_only(options, "multipart batches")
        return await _infer_multipart(request, service, state, options)
    if content_type == "application/json":
        _single_frame_only(options, "streams")
        try:
            spec = StreamRequest.model_validate_json(await request.body())
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or "body"
            raise BadInput("invalid_json", f"invalid stream request: {first['msg']}", param=param) from None
        lines = await state.streams_api.open(spec, options)
        return StreamingResponse(lines, media_type="application/x-ndjson")
    raise UnsupportedMediaType(
        "unsupported_media_type",
        f"Content-Type {content_type or '(none)'} is not accepted: send image/jpeg, image/png, image/bmp, "
        "multipart/form-data with `frame` parts, or application/json with a `source`",
        param="content-type",
        value=content_type,
    )


def _one_of(param: str, header: str | None, query: str | None) -> str | None:
    if header is not None and query is not None and header != query:
        raise BadInput(
            f"conflicting_{param}",
            f"the header says {header[:80]!r} and the query {query[:80]!r}: send one of them",
            param=param,
            value=query[:80],
        )
    return header if header is not None else query


async def _infer_multipart(request: Request, service: Service, state: State, options: InferOptions) -> Response:
    limit = state.settings.max_frames_per_request
    try:
        form = await request.form(max_files=limit, max_part_size=state.settings.max_upload_bytes)
    except MultiPartException as err:
        raise BadInput("bad_multipart", f"malformed multipart body: {err.message}") from None
    parts = [p for p in form.getlist("frame") if isinstance(p, UploadFile)]
    if not parts:
        raise BadInput("no_frames", "the multipart body has no `frame` file parts", param="frame")
    datas = [await p.read() for p in parts]
    per_frame = InferOptions(mask=options.mask, mask_size=options.mask_size, tasks=options.tasks)  # no overlays
    # submitted together so they share engine batches; answered in order
    outcomes = await asyncio.gather(
        *(_named_part(service.infer_bytes(data, per_frame, frame_id=i), i) for i, data in enumerate(datas))
    )
    return _json(orjson.dumps([o.result for o in outcomes], option=orjson.OPT_SERIALIZE_NUMPY))


async def _named_part(call: Awaitable[Outcome], index: int) -> Outcome:
    try:
        return await call
    except BadInput as err:
        err.param, err.message = f"frame[{index}]", f"frame part {index}: {err.message}"
        raise


def _summary(result: dict[str, Any]) -> dict[str, str]:
    """Headers that let an overlay client read the label and latency without a second request."""
    headers = {"X-Latency-Ms": f"{result['latency_ms']['total']:.3f}"}
    activity = result["activity"]
    if activity is not None:
        headers["X-Activity"] = activity["label"]
        headers["X-Activity-Confidence"] = f"{activity['confidence']:.4f}"
    temporal = result.get("activity_temporal")
    if temporal is not None:
        headers["X-Activity-Temporal"] = temporal["label"]
        headers["X-Activity-Temporal-Confidence"] = f"{temporal['confidence']:.4f}"
    return headers
