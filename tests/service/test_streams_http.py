"""Streams through `POST /infer` (JSON source -> NDJSON) on the real server: limits, source end, allowlist,
client disconnect, `GET/DELETE /streams`, unreachable sources. A file: clip stands in for a camera here;
tests/service/test_rtsp_http.py does the same against a real RTSP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import pytest

from tests.service.server import ServerProcess, free_port

CLIP_FPS = 20


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.data.synth import render_image

    folder = tmp_path_factory.mktemp("clips")
    writer = cv2.VideoWriter(str(folder / "case.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), CLIP_FPS, (320, 240))
    base = [render_image(3, i, height=240, width=320).image for i in range(6)]
    for i in range(CLIP_FPS * 3):  # 3 s
        writer.write(cv2.cvtColor(base[i // 10], cv2.COLOR_RGB2BGR))
    writer.release()
    return folder


@pytest.fixture(scope="module")
def streamer(endoarss_bundle: Path, clips: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    unreachable = f"rtsp://127.0.0.1:{free_port()}/"
    env = {
        "ENDOSTREAM_STREAM_ALLOWLIST": f"file:{clips}/,{unreachable}",
        "ENDOSTREAM_STREAM_OPEN_TIMEOUT_S": "1",
        "ENDOSTREAM_BODY_READ_TIMEOUT_S": "1",  # a stream outlives it: the deadline is for the request body only
    }
    proc = ServerProcess(endoarss_bundle, env=env).start(tmp_path_factory.mktemp("streamer"))
    proc.unreachable = unreachable
    yield proc
    proc.stop()


def _stream(server: ServerProcess, body: dict, **kw) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/infer", json=body, timeout=30, **kw) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in reply.iter_lines() if line]


def test_max_frames_then_an_end_line(streamer, clips) -> None:
    lines = _stream(streamer, {"source": f"file:{clips}/case.mp4", "max_frames": 8, "include_frame": True})
    results, end = lines[:-1], lines[-1]
    assert len(results) == 8 and end["end"]["reason"] == "max_frames" and end["end"]["frames"] == 8
    ids = [r["frame"]["id"] for r in results]
    assert ids == sorted(ids) and len(set(ids)) == 8
    first = results[0]
    assert (first["frame"]["width"], first["frame"]["height"]) == (320, 240)
    assert first["frame"]["captured_at"] > time.time() - 60 and first["frame"]["frame_jpeg"]
    assert first["activity"]["label"] and first["segmentation"]["mask"]
    assert first["latency_ms"]["decode"] == 0.0  # decoded by the reader, outside the request pipeline


def test_whole_clip_at_native_rate_until_the_source_ends(streamer, clips) -> None:
    started = time.monotonic()
    lines = _stream(streamer, {"source": f"file:{clips}/case.mp4"})
    elapsed = time.monotonic() - started
    assert lines[-1]["end"]["reason"] == "ended"
    results = lines[:-1]
    processed = len(results)
    dropped = sum(r["frame"]["dropped_before"] for r in results)
    assert processed + dropped <= CLIP_FPS * 3 and processed >= CLIP_FPS * 3 * 0.5
    assert elapsed >= 2.5  # paced at the clip's 20 fps, not decoded as fast as possible


def test_fps_cap(streamer, clips) -> None:
    lines = _stream(streamer, {"source": f"file:{clips}/case.mp4", "fps": 5, "max_seconds": 2})
    assert lines[-1]["end"]["reason"] in ("max_seconds", "ended")
    assert 6 <= len(lines) - 1 <= 12  # ~5 per second for 2 s


@pytest.mark.parametrize(
    "source",
    ["file:/etc/passwd", "rtsp://10.0.0.7/cam", "http://169.254.169.254/latest/meta-data", "file:{clips}/../x.mp4"],
)
def test_sources_outside_the_allowlist_are_refused(streamer, clips, source) -> None:
    reply = httpx.post(f"{streamer.url}/infer", json={"source": source.format(clips=clips)})
    assert reply.status_code == 403, reply.text
    error = reply.json()["error"]
    assert error["code"] == "source_not_allowed" and "ENDOSTREAM_STREAM_ALLOWLIST" in error["message"]


def test_unknown_fields_and_bad_limits_are_400(streamer, clips) -> None:
    for body in ({"source": f"file:{clips}/case.mp4", "frames": 3}, {"source": f"file:{clips}/case.mp4", "fps": -1}):
        reply = httpx.post(f"{streamer.url}/infer", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json", reply.text


def _wait_for_streams(server: ServerProcess, count: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = httpx.get(f"{server.url}/streams").json()
        if len(listed) == count:
            return listed
        time.sleep(0.05)
    raise AssertionError(f"expected {count} streams, have {listed}")


def test_client_disconnect_stops_the_reader(streamer, clips) -> None:
    with httpx.stream("POST", f"{streamer.url}/infer", json={"source": f"file:{clips}/case.mp4"}) as reply:
        lines = reply.iter_lines()
        json.loads(next(lines))
        listed = _wait_for_streams(streamer, 1)
        assert listed[0]["state"] == "streaming" and listed[0]["url"].startswith("file:")
        assert listed[0]["frames_processed"] >= 1
    started = time.monotonic()
    _wait_for_streams(streamer, 0, timeout=3.0)
    assert time.monotonic() - started < 2.0


def test_delete_stream_ends_its_response(streamer, clips) -> None:
    lines: list[dict] = []

    def consume() -> None:
        lines.extend(_stream(streamer, {"source": f"file:{clips}/case.mp4"}))

    worker = threading.Thread(target=consume)
    worker.start()
    stream_id = _wait_for_streams(streamer, 1)[0]["id"]
    assert httpx.delete(f"{streamer.url}/streams/{stream_id}").status_code == 204
    worker.join(5)
    assert not worker.is_alive() and lines[-1]["end"]["reason"] == "stopped"
    missing = httpx.delete(f"{streamer.url}/streams/{stream_id}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_stream"


def test_unreachable_source_ends_with_an_error_line(streamer) -> None:
    started = time.monotonic()
    lines = _stream(streamer, {"source": streamer.unreachable + "cam"})
    assert time.monotonic() - started < 15
    assert len(lines) == 1 and lines[0]["end"]["reason"] == "unreachable"
    assert lines[0]["error"]["code"] == "stream_unreachable" and lines[0]["error"]["message"]
    assert httpx.get(f"{streamer.url}/healthz").status_code == 200


def test_stream_metrics_while_streaming(streamer, clips) -> None:
    from tests.service.metrics_text import scrape, value

    with httpx.stream("POST", f"{streamer.url}/infer", json={"source": f"file:{clips}/case.mp4"}) as reply:
        lines = reply.iter_lines()
        for _ in range(10):
            json.loads(next(lines))
        stream_id = _wait_for_streams(streamer, 1)[0]["id"]
        families = scrape(streamer.url)
    assert value(families, "endostream_frame_age_seconds_count", stream=stream_id) >= 10
    assert value(families, "endostream_stream_fps", stream=stream_id) > 5
    assert value(families, "endostream_stream_up", stream=stream_id) == 1
    assert value(families, "endostream_streams_active") == 1
    assert value(families, "endostream_frames_total", outcome="processed", source="stream") >= 10
    assert "endostream_stream_reconnects" in families


def test_a_stream_outlives_the_body_read_timeout(streamer, clips: Path) -> None:
    body = {"source": f"file:{clips}/case.mp4", "max_seconds": 2.5, "fps": 4}
    with httpx.stream("POST", f"{streamer.url}/infer", json=body, params={"mask": "none"}, timeout=30) as reply:
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    assert lines[-1]["end"]["reason"] in ("max_seconds", "ended"), lines[-1]
    assert len(lines) >= 5
