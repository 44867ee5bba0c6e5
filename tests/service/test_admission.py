"""Frame admission at the door: beyond the limit of frame requests in progress, 503 + Retry-After before the body
is read; other requests (probes, NDJSON streams) pass."""

from __future__ import annotations

import asyncio
import json

from service.metrics import ServiceMetrics
from service.middleware import FrameAdmissionMiddleware


def _scope(method: str, content_type: bytes) -> dict:
    return {"type": "http", "method": method, "path": "/infer", "headers": [(b"content-type", content_type)]}


def test_requests_beyond_the_limit_are_refused_unread() -> None:
    release = asyncio.Event()
    reads: list[str] = []

    async def app(scope, receive, send) -> None:
        reads.append(scope["method"])
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    metrics = ServiceMetrics()
    middleware = FrameAdmissionMiddleware(app, limit=2, metrics=metrics)

    async def call(scope: dict) -> list[dict]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"frame", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await middleware(scope, receive, send)
        return sent

    async def scenario() -> tuple[list[list[dict]], list[dict], list[dict]]:
        held = [asyncio.create_task(call(_scope("POST", b"image/jpeg"))) for _ in range(2)]
        await asyncio.sleep(0.01)
        refused = await asyncio.wait_for(call(_scope("POST", b"multipart/form-data; boundary=x")), 1)
        stream = asyncio.create_task(call(_scope("POST", b"application/json")))  # NDJSON streams: not counted
        await asyncio.sleep(0.01)
        release.set()
        done = await asyncio.gather(*held)
        return done, refused, await stream

    done, refused, stream = asyncio.run(scenario())
    assert [m[0]["status"] for m in done] == [200, 200] and stream[0]["status"] == 200
    start = refused[0]
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert "ENDOSTREAM_MAX_CONCURRENT_REQUESTS=2" in json.loads(refused[1]["body"])["error"]["message"]
    assert reads == ["POST", "POST", "POST"]  # the refused request's body was never read by the app
    assert middleware.active == 0
    assert metrics.rejected.labels("queue_full")._value.get() == 1
