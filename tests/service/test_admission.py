"""Frame admission at the door: beyond the limit of frame requests in progress, 503 + Retry-After before the body
is read; other requests (probes, NDJSON streams) pass."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.admission import AdaptiveLimit
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
    middleware = FrameAdmissionMiddleware(app, limit=AdaptiveLimit(2, tolerance=0), metrics=metrics)

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


def test_fixed_limit_when_tolerance_is_zero() -> None:
    limit = AdaptiveLimit(16, tolerance=0)
    for _ in range(50):
        limit.observe(10.0, in_flight=16)
    limit.shed()
    assert limit.limit == 16 and not limit.adaptive


def test_limit_shrinks_while_requests_are_slow_and_grows_back_when_they_are_not() -> None:
    limit = AdaptiveLimit(16, tolerance=2.0, initial=4)
    limit.observe(0.010, in_flight=1)  # the no-load latency: 10 ms
    for _ in range(200):  # requests in use of the whole limit that stay within 2x: the limit climbs to the ceiling
        limit.observe(0.015, in_flight=limit.limit)
    assert limit.limit == 16
    for _ in range(40):  # overload: every request takes 5x the no-load time
        limit.observe(0.050, in_flight=limit.limit)
    assert limit.limit == 1  # the floor: one request is always admitted
    assert limit.no_load_s == pytest.approx(0.010)


def test_limit_grows_only_when_it_was_reached() -> None:
    limit = AdaptiveLimit(16, tolerance=2.0, initial=4)
    for _ in range(100):
        limit.observe(0.010, in_flight=1)  # fast, but one request at a time never tested the limit of 4
    assert limit.limit == 4


def test_refusals_further_in_shrink_the_limit() -> None:
    limit = AdaptiveLimit(16, tolerance=2.0, initial=8)
    limit.shed()
    limit.shed()
    assert limit.limit == 6  # 8 * 0.9 * 0.9 = 6.48


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"ceiling": 0}, "ceiling must be >= 1"), ({"ceiling": 4, "tolerance": 1.0}, "tolerance must be > 1"),
     ({"ceiling": 4, "backoff": 1.0}, "backoff must be in")],
)  # fmt: skip
def test_bad_limit_settings_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveLimit(**kwargs)


def test_slow_single_frames_lower_the_limit_in_the_middleware() -> None:
    clock = {"delay": 0.0}

    async def app(scope, receive, send) -> None:
        await receive()
        await asyncio.sleep(clock["delay"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict:
        return {"type": "http.request", "body": b"frame", "more_body": False}

    async def send(message: dict) -> None:
        pass

    metrics = ServiceMetrics()
    middleware = FrameAdmissionMiddleware(app, limit=AdaptiveLimit(8, initial=8), metrics=metrics)

    async def scenario() -> None:
        clock["delay"] = 0.002
        await middleware(_scope("POST", b"image/jpeg"), receive, send)
        clock["delay"] = 0.05  # 25x the no-load time
        for _ in range(5):
            await middleware(_scope("POST", b"image/jpeg"), receive, send)
        clock["delay"] = 0.2  # a slow multipart batch is not a sign of overload
        await middleware(_scope("POST", b"multipart/form-data; boundary=x"), receive, send)

    asyncio.run(scenario())
    assert middleware.limit.limit == 4  # 8 * 0.9**5 = 4.7
    assert metrics.admission_limit._value.get() == 4


def test_a_refused_body_is_drained_so_the_connection_stays_usable() -> None:
    """Closing with the body unread makes the kernel reset the connection, which can destroy the 503 in flight."""

    async def app(scope, receive, send) -> None:
        raise AssertionError("a refused request must not reach the app")

    middleware = FrameAdmissionMiddleware(app, limit=AdaptiveLimit(1, tolerance=0), metrics=ServiceMetrics())
    middleware.active = 1  # the one admitted request is in progress
    chunks = [{"type": "http.request", "body": b"x" * 10, "more_body": True} for _ in range(3)]
    chunks.append({"type": "http.request", "body": b"", "more_body": False})
    consumed: list[dict] = []
    sent: list[dict] = []

    async def receive() -> dict:
        consumed.append(chunks[len(consumed)])
        return consumed[-1]

    async def stalled() -> dict:
        await asyncio.sleep(10)
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(middleware(_scope("POST", b"image/jpeg"), receive, send))
    assert len(consumed) == 4 and sent[0]["status"] == 503
    started = asyncio.run(_timed(middleware, stalled, send))
    assert started < 2.0 and sent[-2]["status"] == 503  # a stalled body is given up after 1 s, then refused


async def _timed(middleware: FrameAdmissionMiddleware, receive, send) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await middleware(_scope("POST", b"image/jpeg"), receive, send)
    return loop.time() - start


def test_two_frames_that_collide_are_not_overload() -> None:
    limit = AdaptiveLimit(16, tolerance=1.5, initial=4)
    for index in range(200):  # a moderate load: now and then a frame waits for another one (2x), mostly not
        limit.observe(0.020 if index % 10 == 0 else 0.010, in_flight=limit.limit)
    assert limit.limit == 16
