"""`GET /ws/infer`: a capture box pushes binary JPEG/PNG frames and receives one JSON result per processed frame.

Frames arriving while the engine is busy replace each other (latest wins); each result says in
`frame.dropped_before` how many were skipped. A bad frame gets an error message and the session goes on. With
`mask=raw` each result is a binary message in the compact format (README "Compact responses"). With a temporal head
the connection carries one temporal state, stepped on the frames' arrival times (so frames dropped to stay live
advance time by the gap they leave); it ends with the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect

from service.deps import websocket_authorized
from service.errors import ServiceError
from service.live import LatestSlot
from service.postprocess import InferOptions
from service.schemas import MaskFormat, MaskSize
from service.state import AppState
from service.temporal import Track

router = APIRouter(tags=["inference"])

POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013


@router.websocket("/ws/infer")
async def ws_infer(
    websocket: WebSocket,
    mask: Annotated[MaskFormat, Query()] = "png",
    mask_size: Annotated[MaskSize, Query()] = "model",
    tasks: Annotated[str | None, Query()] = None,
) -> None:
    state: AppState = websocket.app.state.endostream
    if not websocket_authorized(websocket):
        await websocket.close(code=POLICY_VIOLATION, reason="unauthorized: send Authorization: Bearer or ?token=")
        return
    await websocket.accept()
    service = state.service
    try:
        names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
        options = InferOptions(mask=mask, mask_size=mask_size, tasks=service.validate_tasks(names))
    except ServiceError as err:
        await websocket.send_json(err.body())
        await websocket.close(code=POLICY_VIOLATION)
        return
    if not state.batcher.ready:
        await websocket.send_json({"error": {"code": "not_ready", "message": "the engine is warming up; reconnect"}})
        await websocket.close(code=TRY_AGAIN_LATER)
        return
    slot = LatestSlot()
    metrics = state.metrics
    temporal = service.new_temporal_state("websocket")

    async def receive() -> None:
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data is None:
                    await websocket.send_json(
                        {"error": {"code": "expected_binary", "message": "send frames as binary JPEG/PNG messages"}}
                    )
                    continue
                if slot.put(data):
                    metrics.frames.labels("dropped", "websocket").inc()
                    metrics.dropped.labels("stale", "websocket").inc()
        except WebSocketDisconnect:
            pass
        finally:
            slot.close()

    receiver = asyncio.create_task(receive())
    try:
        while (pushed := await slot.get()) is not None:
            track = None if temporal is None else Track(temporal, pushed.received_at, "arrival")
            try:
                outcome = await service.infer_bytes(
                    pushed.data, options, frame_id=pushed.index, source="websocket", track=track
                )
            except ServiceError as err:
                body = err.body()
                body["frame"] = {"id": pushed.index}
                await websocket.send_text(json.dumps(body))
                continue
            outcome.result["frame"]["dropped_before"] = pushed.dropped_before
            if options.mask == "raw":  # the compact response as a binary message
                await websocket.send_bytes(outcome.compact())
            else:
                await websocket.send_text(outcome.json().decode())
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away mid-send
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
