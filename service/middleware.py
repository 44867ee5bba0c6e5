"""Plain ASGI middleware: request ids, RED metrics per route template, and the upload size limit."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "the client closed the request": recorded, never sent


class RequestIdMiddleware:
    """Echo `X-Request-ID` (or make one) so a client's log line can be matched with ours."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"")[:64] or uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class MetricsMiddleware:
    """Request duration by route template (never the raw path: ids would explode the label set) and status class."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        streamed = {"ndjson": False}
        started = time.perf_counter()
        self.metrics.in_flight.inc()

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                streamed["ndjson"] = content_type.startswith(b"application/x-ndjson")
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except ClientDisconnect:
            # The client went away (mid-upload, or while a stream was being written): nothing is wrong with the
            # server, so no traceback and no 5xx sample to feed the error-ratio alert.
            if not streamed["ndjson"]:
                status["code"] = CLIENT_CLOSED
            logger.info("client disconnected: %s %s", scope["method"], scope.get("path", ""))
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            if streamed["ndjson"]:  # a stream request lasts seconds to hours: keep it out of the per-frame histogram
                template += ":stream"
            self.metrics.request_duration.labels(template, scope["method"], f"{status['code'] // 100}xx").observe(
                time.perf_counter() - started
            )


class BodyLimitMiddleware:
    """Refuse request bodies over `limit` bytes: at once from Content-Length, or mid-stream for chunked uploads."""

    def __init__(self, app: ASGIApp, limit: int, metrics: ServiceMetrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, int(declared))
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    self.metrics.rejected.labels("too_large").inc()
                    raise PayloadTooLarge(
                        "body_too_large",
                        f"the body exceeds {self.limit} bytes (ENDOSTREAM_MAX_UPLOAD_BYTES)",
                        param="body",
                        value=seen,
                    )
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, send: Send, size: int) -> None:
        self.metrics.rejected.labels("too_large").inc()
        error = PayloadTooLarge(
            "body_too_large",
            f"the body is {size} bytes; the limit is {self.limit} (ENDOSTREAM_MAX_UPLOAD_BYTES)",
            param="body",
            value=size,
        )
        body = json.dumps(error.body()).encode()
        headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
