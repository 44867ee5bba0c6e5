"""A real RTSP camera (GStreamer server) through the real service: results flow, the camera dies mid-stream and
comes back, and the same `POST /infer` response carries on after the reconnect."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.metrics_text import scrape, value
from tests.service.rtsp import RtspServer, rtsp_unavailable, video_clip  # noqa: F401 - fixture
from tests.service.server import ServerProcess


@pytest.fixture
def camera(video_clip: Path) -> Iterator[RtspServer]:  # noqa: F811 - the imported fixture
    reason = rtsp_unavailable()
    if reason:
        pytest.skip(reason)
    server = RtspServer(video_clip).start()
    yield server
    server.close()


def test_rtsp_stream_survives_a_camera_restart(camera: RtspServer, endoarss_bundle: Path, tmp_path: Path) -> None:
    env = {
        "ENDOSTREAM_STREAM_ALLOWLIST": f"rtsp://127.0.0.1:{camera.port}/",
        "ENDOSTREAM_STREAM_OPEN_TIMEOUT_S": "2",
        "ENDOSTREAM_STREAM_READ_TIMEOUT_S": "2",
    }
    service = ServerProcess(endoarss_bundle, env=env).start(tmp_path)
    lines: list[tuple[float, dict]] = []
    try:

        def consume() -> None:
            body = {"source": camera.url, "max_seconds": 25}
            with httpx.stream("POST", f"{service.url}/infer", json=body, timeout=40) as reply:
                assert reply.status_code == 200
                for line in reply.iter_lines():
                    if line:
                        lines.append((time.monotonic(), json.loads(line)))

        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        _wait(lambda: len(lines) >= 10, 15, "10 results from the camera")
        stream = httpx.get(f"{service.url}/streams").json()[0]
        assert stream["state"] == "streaming" and stream["fps"] > 10 and stream["url"] == camera.url
        before_kill = len(lines)

        camera.kill()  # the camera crashes: no RTSP teardown
        _wait(lambda: httpx.get(f"{service.url}/streams").json()[0]["state"] == "reconnecting", 10, "reconnecting")
        down = httpx.get(f"{service.url}/streams").json()[0]
        assert down["last_error"]
        camera.start()
        restarted = time.monotonic()
        _wait(lambda: any(t > restarted for t, _ in lines), 20, "results after the camera came back")
        recovered = next(t for t, _ in lines if t > restarted) - restarted
        _wait(lambda: sum(t > restarted for t, _ in lines) >= 10, 10, "10 results after the restart")
        listed = httpx.get(f"{service.url}/streams").json()[0]
        assert listed["state"] == "streaming" and listed["reconnects"] >= 1
        families = scrape(service.url)
        assert value(families, "endostream_stream_reconnects_total", stream=listed["id"]) >= 1
        assert value(families, "endostream_frame_age_seconds_count", stream=listed["id"]) >= before_kill

        assert httpx.delete(f"{service.url}/streams/{listed['id']}").status_code == 204
        reader.join(10)
        results = [item for _, item in lines if "frame" in item and "activity" in item]
        assert lines[-1][1]["end"]["reason"] == "stopped"
        assert all(r["latency_ms"]["batch_size"] == 1 for r in results)  # a lone stream is never batched
        assert len(results) >= before_kill + 10
        print(f"camera restart: first result {recovered:.2f} s after the server came back")
    finally:
        service.stop()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
