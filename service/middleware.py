"""Plain ASGI middleware: request ids, RED metrics per route template, and the upload size limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import AdaptiveLimit
from service.errors import Overloaded, PayloadTooLarge, RequestTimeout, ServiceError
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
    """Bound what request bodies may hold: size, time, and memory across all requests.

    - Over `limit` bytes: 413, at once from Content-Length, or mid-stream for chunked uploads.
    - Not complete within `read_timeout_s` of the request's start: 408 (a client that declares 1,000 bytes and
      sends 10 would otherwise hold its buffer and a slot forever).
    - More than `inflight_limit` bytes of bodies held at once, across requests (declared lengths are reserved
      up front, chunked bodies as they arrive, all released when the request ends): 503 + Retry-After, so 40 slow
      uploads cannot grow the process by their sum.
    """

    def __init__(
        self, app: ASGIApp, limit: int, metrics: ServiceMetrics, *, read_timeout_s: float, inflight_limit: int
    ) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.read_timeout_s = read_timeout_s
        self.inflight_limit = inflight_limit
        self.inflight = 0  # bytes reserved by requests in progress (one event loop: no lock needed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared_header = headers.get(b"content-length")
        declared = int(declared_header) if declared_header is not None and declared_header.isdigit() else None
        if declared is not None and declared > self.limit:
            await self._refuse(send, declared)
            return
        reserved = declared or 0
        if reserved and self.inflight + reserved > self.inflight_limit:
            await self._busy(send)
            return
        self.inflight += reserved
        seen = 0
        deadline = asyncio.get_running_loop().time() + self.read_timeout_s

        body_done = False

        async def counting_receive() -> Message:
            nonlocal seen, reserved, body_done
            if body_done:  # later receives wait for the client's disconnect (streamed responses): no deadline
                return await receive()
            try:
                # a timeout scope, not wait_for: wait_for wraps every body chunk of every frame in a new task
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                self.metrics.rejected.labels("body_timeout").inc()
                raise RequestTimeout(
                    "body_timeout",
                    f"the body did not arrive within {self.read_timeout_s:g} s ({seen} bytes came; "
                    f"ENDOSTREAM_BODY_READ_TIMEOUT_S)",
                    param="body",
                ) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    self.metrics.rejected.labels("too_large").inc()
                    raise PayloadTooLarge(
                        "body_too_large",
                        f"the body exceeds {self.limit} bytes (ENDOSTREAM_MAX_UPLOAD_BYTES)",
                        param="body",
                        value=seen,
                    )
                if seen > reserved:  # chunked, or more than declared: reserve what arrived
                    grow = seen - reserved
                    if self.inflight + grow > self.inflight_limit:
                        self.metrics.rejected.labels("bodies_in_flight").inc()
                        raise Overloaded(_busy_message(self.inflight_limit))
                    self.inflight += grow
                    reserved = seen
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            self.inflight -= reserved

    async def _refuse(self, send: Send, size: int) -> None:
        self.metrics.rejected.labels("too_large").inc()
        error = PayloadTooLarge(
            "body_too_large",
            f"the body is {size} bytes; the limit is {self.limit} (ENDOSTREAM_MAX_UPLOAD_BYTES)",
            param="body",
            value=size,
        )
        await _send_error(send, error, 413)

    async def _busy(self, send: Send) -> None:
        self.metrics.rejected.labels("bodies_in_flight").inc()
        error = Overloaded(_busy_message(self.inflight_limit))
        await _send_error(send, error, 503, [(b"retry-after", str(error.retry_after).encode())])


class FrameAdmissionMiddleware:
    """At most `limit.limit` frame requests (POST with an image or multipart body) in progress; beyond it, 503 +
    Retry-After at once, before a byte of the body is read.

    Under overload the requests that cannot be served must be refused at the door: once admitted, a request's body
    is read by the event loop alongside every other admitted body, so admitting more than the engine can take only
    spreads the loop over more bodies and makes every frame late (the queue-based admission behind it never sees
    frames that are still arriving). The limit adapts to the latency it causes (`service.admission`), with
    ENDOSTREAM_MAX_CONCURRENT_REQUESTS as its ceiling. NDJSON stream requests are long-lived and capped by
    ENDOSTREAM_MAX_STREAMS.
    """

    def __init__(self, app: ASGIApp, limit: AdaptiveLimit, metrics: ServiceMetrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.active = 0
        metrics.admission_limit.set(limit.limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = _content_type(scope)
        if scope["type"] != "http" or scope["method"] != "POST" or content_type == b"application/json":
            await self.app(scope, receive, send)
            return
        limit = self.limit.limit
        if self.active >= limit:
            self.metrics.rejected.labels("queue_full").inc()
            error = Overloaded(
                f"{self.active} frame requests are in progress, the most the service admits now (latency-adaptive, "
                f"ENDOSTREAM_MAX_CONCURRENT_REQUESTS={self.limit.ceiling} at most); retry shortly or add capacity"
            )
            await _drain_body(receive)
            await _send_error(send, error, 503, [(b"retry-after", str(error.retry_after).encode())])
            return
        self.active += 1
        in_flight = self.active
        body_done: float | None = None
        status = 0

        async def timed_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_done = time.perf_counter()
            return message

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, timed_receive, status_send)
        finally:
            self.active -= 1
        if status == 503:  # the queue behind refused it: more admitted requests would only wait there
            self.limit.shed()
        elif status == 200 and content_type.startswith(b"image/"):
            # One-frame requests only: a multipart batch takes longer for its size, not because the server is behind.
            self.limit.observe(time.perf_counter() - (body_done or started), in_flight)
        self.metrics.admission_limit.set(self.limit.limit)


async def _drain_body(receive: Receive, deadline_s: float = 1.0) -> None:
    """Read and drop a refused request's body (holding one chunk at a time) before answering, so the connection can
    carry the client's next request. A server that answers and closes with the body unread makes the kernel reset the
    connection, and the reset can destroy the 503 before the client reads it (about 1 refusal in 1,000 under 3x
    overload). A body that does not arrive within `deadline_s` is left unread: the server then closes as before."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(deadline_s):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return


def _content_type(scope: Scope) -> bytes:
    for key, value in scope.get("headers") or ():
        if key == b"content-type":
            return value.split(b";")[0].strip().lower()
    return b""


def _busy_message(limit: int) -> str:
    return f"request bodies already in flight hold {limit} bytes (ENDOSTREAM_MAX_INFLIGHT_BODY_BYTES); retry shortly"


async def _send_error(send: Send, error: ServiceError, status: int, extra: list[Any] | None = None) -> None:
    body = json.dumps(error.body()).encode()
    headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})
