"""Temporal answers through the real server: HTTP sessions (header or query, client or arrival time), validation,
concurrency within a session, one state per WebSocket connection, the compact response, /model, OpenAPI, metrics,
and bundles without a head (a session is a no-op there)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from service.postprocess import decode_compact
from tests.service.conftest import encode
from tests.service.metrics_text import scrape, value
from tests.service.server import ServerProcess
from tests.service.temporal_bundle import ALPHA, FIELD, ema_reference


@pytest.fixture(scope="module")
def tserver(temporal_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(temporal_bundle, env={"ENDOSTREAM_MAX_PIXELS": str(2000 * 2000)})
    proc.start(tmp_path_factory.mktemp("tserver"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def jpegs(frames) -> list[bytes]:
    return [encode(f) for f in frames[:3]]


def _post(server: ServerProcess, data: bytes, headers: dict | None = None, **params) -> httpx.Response:
    return httpx.post(
        f"{server.url}/infer", content=data, headers={"content-type": "image/jpeg", **(headers or {})}, params=params
    )


def _vector(probabilities: dict[str, float]) -> np.ndarray:
    return np.array(list(probabilities.values()))


def test_session_frames_carry_the_temporal_answer(tserver, jpegs) -> None:
    results = []
    for i in range(6):  # 0.1 s apart: one head step per frame
        reply = _post(tserver, jpegs[i % 3], {"X-Session-Id": "case-1", "X-Frame-Time": f"{100 + 0.1 * i:.1f}"})
        assert reply.status_code == 200, reply.text
        results.append(reply.json())
    steps = [r["activity_temporal"]["steps"] for r in results]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert results[0]["activity_temporal"]["reset"] and not results[1]["activity_temporal"]["reset"]
    per_frame = [_vector(r["activity"]["probabilities"]) for r in results]
    for n, result in enumerate(results, start=1):
        temporal = result["activity_temporal"]
        np.testing.assert_allclose(_vector(temporal["probabilities"]), ema_reference(per_frame[:n], ALPHA), atol=1e-5)
        assert temporal["label"] == max(temporal["probabilities"], key=temporal["probabilities"].get)
        assert temporal["method"] == "ema" and temporal["context_frames"] == min(n, 8)
        assert set(result["activity"]) == {"task", "label", "index", "confidence", "probabilities"}  # unchanged
        assert result["latency_ms"]["temporal"] >= 0
    # the same id in the query continues the same session
    reply = _post(tserver, jpegs[0], session="case-1", t="100.7")
    assert reply.json()["activity_temporal"]["steps"] == 8  # 100.7 is two intervals after 100.5: one held step
    assert reply.json()["activity_temporal"]["held"] == 1


def test_sessions_are_separate_and_arrival_time_is_the_default(tserver, jpegs) -> None:
    a = _post(tserver, jpegs[0], {"X-Session-Id": "arrival-a"}).json()["activity_temporal"]
    b = _post(tserver, jpegs[1], {"X-Session-Id": "arrival-b"}).json()["activity_temporal"]
    assert a["steps"] == b["steps"] == 1 and a["reset"] and b["reset"]
    time.sleep(0.25)
    again = _post(tserver, jpegs[0], {"X-Session-Id": "arrival-a"}).json()["activity_temporal"]
    assert again["steps"] >= 2 and not again["reset"]  # at least one 0.1 s interval went by


def test_no_session_no_temporal_answer(tserver, jpegs) -> None:
    result = _post(tserver, jpegs[0]).json()
    assert "activity_temporal" not in result and "temporal" not in result["latency_ms"]
    assert result["activity"] is not None


@pytest.mark.parametrize(
    ("headers", "params", "code", "param"),
    [
        ({"X-Session-Id": "no spaces"}, {}, "bad_session", "session"),
        ({}, {"session": "x" * 65}, "bad_session", "session"),
        ({"X-Session-Id": "a"}, {"session": "b"}, "conflicting_session", "session"),
        ({"X-Session-Id": "a", "X-Frame-Time": "soon"}, {}, "bad_frame_time", "t"),
        ({}, {"session": "a", "t": "-3"}, "bad_frame_time", "t"),
        ({"X-Frame-Time": "1.0"}, {}, "frame_time_without_session", "t"),
    ],
)
def test_bad_session_requests_get_a_clear_400(tserver, jpegs, headers, params, code, param) -> None:
    reply = _post(tserver, jpegs[0], headers, **params)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == code and error["param"] == param, error


def test_batches_and_streams_take_no_session(tserver, jpegs) -> None:
    files = [("frame", ("0.jpg", jpegs[0], "image/jpeg"))]
    reply = httpx.post(f"{tserver.url}/infer", files=files, headers={"X-Session-Id": "batch"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "session_single_frame"
    reply = httpx.post(f"{tserver.url}/infer", json={"source": "file:/x.mp4"}, params={"session": "s"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "session_single_frame"


def test_compact_response_and_overlay_carry_it(tserver, jpegs) -> None:
    reply = _post(tserver, jpegs[0], {"X-Session-Id": "compact", "X-Frame-Time": "1"}, mask="raw")
    result, mask = decode_compact(reply.content)
    assert result["activity_temporal"]["steps"] == 1 and mask is not None
    reply = _post(tserver, jpegs[0], {"X-Session-Id": "compact", "X-Frame-Time": "1.1"}, overlay="true")
    assert reply.headers["content-type"] == "image/png"
    assert reply.headers["X-Activity-Temporal"] in result["activity_temporal"]["probabilities"]


def test_concurrent_frames_of_one_session_step_it_once_each(tserver, jpegs) -> None:
    """Frames of one session sent 4 at a time: no step is taken twice or lost, whatever order they arrive in."""
    answers: list[dict] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        with httpx.Client(base_url=tserver.url, timeout=30) as http:
            for i in range(8):
                t = 500 + 0.1 * (offset + 4 * i)
                reply = http.post(
                    "/infer",
                    content=jpegs[i % 3],
                    headers={"content-type": "image/jpeg", "X-Session-Id": "busy", "X-Frame-Time": f"{t:.1f}"},
                    params={"mask": "none"},
                )
                assert reply.status_code == 200, reply.text
                with lock:
                    answers.append(reply.json()["activity_temporal"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stepped = [a for a in answers if a["stepped"]]
    assert len({a["steps"] for a in stepped}) == len(stepped)  # each step count seen by one frame only
    last = _post(tserver, jpegs[0], {"X-Session-Id": "busy", "X-Frame-Time": "600"}).json()["activity_temporal"]
    # 600 s is past the reset timeout: fresh again; the state before it had taken every counted step
    assert last["reset"] and last["steps"] == 1
    total = 1 + sum(a["stepped"] for a in stepped if not a["reset"])
    assert max(a["steps"] for a in stepped) == total


def test_each_websocket_connection_has_its_own_state(tserver, jpegs) -> None:
    url = tserver.url.replace("http://", "ws://") + "/ws/infer?mask=none"

    async def run() -> tuple[list[dict], list[dict]]:
        async with websockets.connect(url) as first, websockets.connect(url) as second:
            a: list[dict] = []
            for i in range(3):
                await first.send(jpegs[i % 3])
                a.append(json.loads(await first.recv()))
                await asyncio.sleep(0.25)
            await second.send(jpegs[1])
            b = [json.loads(await second.recv())]
        async with websockets.connect(url) as third:  # a new connection starts fresh
            await third.send(jpegs[2])
            b.append(json.loads(await third.recv()))
        return a, b

    a, b = asyncio.run(run())
    assert [r["activity_temporal"]["steps"] for r in a][0] == 1
    assert (
        a[1]["activity_temporal"]["steps"] > 1
        and a[2]["activity_temporal"]["steps"] > a[1]["activity_temporal"]["steps"]
    )
    assert a[2]["activity_temporal"]["held"] >= 1  # 0.25 s between frames: a step held over the gap
    for result in b:
        assert result["activity_temporal"]["steps"] == 1 and result["activity_temporal"]["reset"]
        np.testing.assert_allclose(
            _vector(result["activity_temporal"]["probabilities"]),
            _vector(result["activity"]["probabilities"]),
            atol=1e-5,
        )


def test_model_openapi_and_metrics_describe_it(tserver, jpegs) -> None:
    model = httpx.get(f"{tserver.url}/model").json()
    assert model["temporal"]["method"] == "ema" and model["temporal"]["frame_interval_s"] == 0.1
    assert model["temporal"]["receptive_field_frames"] == FIELD and model["manifest"]["temporal"]["graph"]
    schema = httpx.get(f"{tserver.url}/openapi.json").json()
    result = schema["components"]["schemas"]["InferResult"]["properties"]
    assert "activity_temporal" in result
    fields = schema["components"]["schemas"]["TemporalActivityResult"]["properties"]
    assert {"label", "confidence", "probabilities", "context_frames", "method", "steps", "stepped", "held"} <= set(
        fields
    )
    params = {p["name"] for p in schema["paths"]["/infer"]["post"]["parameters"]}
    assert {"session", "t", "x-session-id", "x-frame-time"} <= params
    families = scrape(tserver.url)
    assert value(families, "endostream_temporal_sessions") >= 1
    names = {labels["answer"] for _, labels, _ in families["endostream_activity_label_switches"]}
    assert names == {"frame", "temporal"}


def test_without_a_head_a_session_is_a_no_op(server, jpegs) -> None:
    reply = _post(server, jpegs[0], {"X-Session-Id": "case-1", "X-Frame-Time": "1"})
    assert reply.status_code == 200 and "activity_temporal" not in reply.json()
    assert httpx.get(f"{server.url}/model").json()["temporal"] is None
    reply = _post(server, jpegs[0], {"X-Session-Id": "bad id"})  # ids are still checked: client bugs surface
    assert reply.status_code == 400
