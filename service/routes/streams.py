"""`GET /streams` and `DELETE /streams/{id}`: the live sources being read and their health."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import Authorized, State
from service.errors import NotFound
from service.schemas import ErrorBody, StreamInfo

router = APIRouter(tags=["streams"], dependencies=[Authorized])


@router.get("/streams", response_model=list[StreamInfo], summary="Streams being read, with fps, drops, reconnects")
async def list_streams(state: State) -> list[StreamInfo]:
    return state.streams_api.snapshot()


@router.delete(
    "/streams/{stream_id}",
    status_code=204,
    responses={404: {"model": ErrorBody, "description": "no such stream"}},
    summary="Stop reading a stream; its /infer response ends with a final line",
)
async def stop_stream(stream_id: str, state: State) -> Response:
    if not state.streams_api.stop(stream_id):
        raise NotFound("unknown_stream", f"no stream {stream_id!r}; GET /streams lists them", param="stream_id")
    return Response(status_code=204)
