"""Stream ingestion against real sources: a generated MP4, a GStreamer RTSP server, an MJPEG HTTP server, dead ports."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.settings import Settings
from service.streams import (
    CapturedFrame,
    LatestFrame,
    ReaderOptions,
    SourceNotAllowed,
    StreamNotFound,
    StreamReader,
    StreamRegistry,
    backoff_delay,
    is_allowed,
    normalize,
    redact,
    validate_source,
)
from tests.service import rtsp
from tests.service.rtsp import CLIP_FPS, CLIP_SECONDS, CLIP_SIZE, RtspServer, free_port

# Fixtures shared through tests/service/rtsp.py (a plain module, so other test files can bind them the same way).
video_clip = rtsp.video_clip
rtsp_server = rtsp.rtsp_server

pytestmark = pytest.mark.timeout(60)
FAST = {"open_timeout": 2.0, "read_timeout": 1.0, "backoff_initial": 0.1, "backoff_max": 0.5}


def wait_for(predicate, timeout: float, what: str) -> float:
    """Poll `predicate` until true; returns the seconds it took, fails naming `what` on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def file_url(path: Path) -> str:
    return path.resolve().as_uri()


class Recorder:
    """A real listener that keeps what it was told (the reader calls it from its own thread)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def _add(self, kind: str, value: str) -> None:
        with self.lock:
            self.events.append((kind, value))

    def on_frame(self, stream_id: str) -> None:
        self._add("frame", stream_id)

    def on_drop(self, stream_id: str, reason: str) -> None:
        self._add("drop", reason)

    def on_reconnect(self, stream_id: str) -> None:
        self._add("reconnect", stream_id)

    def on_state(self, stream_id: str, state: str) -> None:
        self._add("state", state)

    def states(self) -> list[str]:
        with self.lock:
            return [v for k, v in self.events if k == "state"]


# -- latest-frame buffer -------------------------------------------------------------------------------------------


def _frame(index: int) -> CapturedFrame:
    return CapturedFrame(np.zeros((2, 2, 3), np.uint8), index, time.time())


def test_latest_frame_keeps_only_the_newest_and_counts_drops() -> None:
    slot = LatestFrame()
    assert slot.get(timeout=0.01) is None
    assert slot.put(_frame(0)) is False
    assert slot.put(_frame(1)) is True  # frame 0 was never taken
    got = slot.get(timeout=0.1)
    assert got is not None and got.index == 1 and slot.dropped == 1
    assert slot.get(timeout=0.05) is None  # nothing newer than the one taken
    assert slot.put(_frame(2)) is False  # frame 1 was taken: overwriting it is no drop
    assert slot.get(timeout=0.1, after_index=0).index == 2
    assert slot.get(timeout=0.1, after_index=0).index == 2  # a second consumer with its own cursor
    threading.Timer(0.05, slot.close).start()
    start = time.monotonic()
    assert slot.get(timeout=5) is None and time.monotonic() - start < 1  # close wakes a waiting consumer


# -- file sources --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["opencv", "pyav"])
def test_file_plays_at_native_fps_then_ends(video_clip: Path, backend: str) -> None:
    recorder = Recorder()
    reader = StreamReader(file_url(video_clip), ReaderOptions(backend=backend), listener=recorder).start()
    frames, start = [], time.monotonic()
    while (frame := reader.get(timeout=3)) is not None:
        frames.append(frame)
    elapsed = time.monotonic() - start
    expected = int(CLIP_SECONDS * CLIP_FPS)
    assert reader.state == "ended", reader.stats()
    assert [f.index for f in frames] == list(range(expected))  # a fast consumer sees every frame, in order
    assert frames[0].image.shape == (*CLIP_SIZE, 3) and frames[0].image.dtype == np.uint8
    assert frames[0].image.flags["C_CONTIGUOUS"]
    assert 0.8 * CLIP_SECONDS < elapsed < 1.5 * CLIP_SECONDS, f"{expected} frames took {elapsed:.2f} s"
    pts = [f.pts for f in frames]
    assert pts[0] == pytest.approx(0.0, abs=1e-3) and pts[-1] == pytest.approx((expected - 1) / CLIP_FPS, abs=1e-3)
    assert recorder.states() == ["connecting", "streaming", "ended"]
    stats = reader.stats()
    assert stats.frames_read == expected and stats.frames_dropped == 0 and stats.reconnects == 0
    assert reader.stop()


def test_file_loop_without_pacing(video_clip: Path) -> None:
    reader = StreamReader(file_url(video_clip), ReaderOptions(realtime=False, loop=True)).start()
    try:
        took = wait_for(lambda: reader.stats().frames_read > 3 * CLIP_SECONDS * CLIP_FPS, 10, "three passes")
        assert took < CLIP_SECONDS, "realtime=False should decode faster than the clip plays"
        assert reader.state == "streaming" and reader.stats().reconnects == 0
    finally:
        assert reader.stop()
    assert reader.state == "stopped"


def test_slow_consumer_gets_the_latest_frame_not_a_queue(video_clip: Path) -> None:
    reader = StreamReader(file_url(video_clip)).start()
    seen = []
    while (frame := reader.get(timeout=3)) is not None:
        newest = reader.frames.peek()
        assert newest is not None and frame.index == newest.index  # never an old frame from a backlog
        seen.append(frame.index)
        time.sleep(0.2)  # 5 fps consumer on a 20 fps source
    stats = reader.stats()
    assert stats.frames_read == CLIP_SECONDS * CLIP_FPS
    assert stats.frames_dropped > 0 and stats.frames_dropped == stats.frames_read - len(seen)
    assert min(np.diff(seen)) >= 2, f"consumer should skip frames, got {seen}"


def test_missing_file_fails_with_the_path(tmp_path: Path) -> None:
    reader = StreamReader(file_url(tmp_path / "nope.mp4")).start()
    wait_for(lambda: reader.state == "failed", 5, "state failed")
    assert "nope.mp4" in (reader.stats().last_error or "")


# -- HTTP MJPEG ----------------------------------------------------------------------------------------------------


@pytest.fixture
def mjpeg_url() -> Iterator[str]:
    """A real multipart/x-mixed-replace JPEG server on 127.0.0.1 (what IP cameras and mjpg-streamer send)."""
    jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), (30, 60, 200), np.uint8))[1].tobytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            try:
                while not stop.is_set():
                    head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                    self.wfile.write(head.encode() + jpeg + b"\r\n")
                    time.sleep(0.05)
            except OSError:
                pass  # client went away

        def log_message(self, *args: object) -> None:
            pass

    stop = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/video.mjpg"
    stop.set()
    server.shutdown()
    server.server_close()


def test_http_mjpeg_source(mjpeg_url: str) -> None:
    with StreamReader(mjpeg_url, ReaderOptions(**FAST)) as reader:
        frame = reader.get(timeout=10)
        assert frame is not None, reader.stats()
        assert frame.image.shape == (48, 64, 3)
        assert frame.image[0, 0, 0] > 150 and frame.image[0, 0, 2] < 80  # RGB order (the server drew BGR red)
        wait_for(lambda: reader.stats().frames_read >= 5, 5, "5 MJPEG frames")


# -- RTSP ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["opencv", "pyav"])
def test_rtsp_streams_at_clip_fps(rtsp_server: RtspServer, backend: str) -> None:
    with StreamReader(rtsp_server.url, ReaderOptions(backend=backend, **FAST)) as reader:
        first = reader.get(timeout=8)
        assert first is not None, reader.stats()
        assert first.image.shape == (*CLIP_SIZE, 3)
        time.sleep(0.5)  # let the burst of frames FFmpeg buffered while probing pass
        n0, t0 = reader.stats().frames_read, time.monotonic()
        time.sleep(1.5)
        rate = (reader.stats().frames_read - n0) / (time.monotonic() - t0)
        assert rate == pytest.approx(CLIP_FPS, rel=0.25)
        assert reader.stats().fps == pytest.approx(CLIP_FPS, rel=0.25)
        assert reader.state == "streaming"


def test_rtsp_server_killed_then_restarted(rtsp_server: RtspServer) -> None:
    recorder = Recorder()
    with StreamReader(rtsp_server.url, ReaderOptions(**FAST), listener=recorder) as reader:
        assert reader.get(timeout=8) is not None, reader.stats()
        rtsp_server.kill()
        wait_for(lambda: reader.state == "reconnecting", 5, "reconnecting after the server died")
        wait_for(lambda: reader.stats().reconnects >= 2, 5, "reconnect attempts")
        assert reader.stats().last_error
        rtsp_server.start()
        before = reader.stats().frames_read
        wait_for(lambda: reader.stats().frames_read > before + 5, 10, "frames after the restart")
        assert reader.state == "streaming" and reader.stats().consecutive_failures == 0
    states = recorder.states()
    assert states[:2] == ["connecting", "streaming"] and "reconnecting" in states and states[-1] == "stopped"
    assert any(kind == "reconnect" for kind, _ in recorder.events)


def test_rtsp_watchdog_reopens_a_hung_stream(rtsp_server: RtspServer) -> None:
    with StreamReader(rtsp_server.url, ReaderOptions(backend="pyav", **FAST)) as reader:
        assert reader.get(timeout=8) is not None, reader.stats()
        rtsp_server.pause()  # socket stays open, no packets: only a read timeout/watchdog notices
        try:
            wait_for(lambda: reader.state == "reconnecting", 5, "the watchdog to reopen")
        finally:
            rtsp_server.resume()
        before = reader.stats().frames_read
        wait_for(lambda: reader.stats().frames_read > before + 5, 10, "frames after resuming")


# -- unreachable sources, backoff, stop ----------------------------------------------------------------------------


def test_backoff_delay_full_jitter_grows_and_caps() -> None:
    rng = random.Random(0)
    for failures, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (20, 1.0)]:
        delays = [backoff_delay(failures, 0.1, 1.0, 2.0, rng) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= ceiling
        assert max(delays) > 0.8 * ceiling  # jitter spans the whole range


def test_backoff_options_are_checked_and_follow_the_service_setting() -> None:
    with pytest.raises(ValueError, match=r"backoff_initial \(2.0\) must not exceed backoff_max \(1.0\)"):
        ReaderOptions(backoff_initial=2.0, backoff_max=1.0)
    assert ReaderOptions().backoff_max == Settings().stream_backoff_max_s == 1.0


def test_unreachable_source_backs_off_and_stops_promptly() -> None:
    url = f"rtsp://user:secret@127.0.0.1:{free_port()}/cam"  # closed port: connection refused
    options = ReaderOptions(open_timeout=1.0, read_timeout=1.0, backoff_initial=0.05, backoff_max=0.4)
    reader = StreamReader(url, options).start()
    wait_for(lambda: reader.stats().consecutive_failures >= 4, 10, "four failed attempts")
    stats = reader.stats()
    assert stats.state == "reconnecting" and stats.reconnects >= 3 and stats.frames_read == 0
    assert stats.last_error and "could not open" in stats.last_error and "secret" not in stats.last_error
    start = time.monotonic()
    assert reader.stop()
    assert time.monotonic() - start < 1.5 and reader.state == "stopped"


def test_max_reconnects_ends_in_failed() -> None:
    options = ReaderOptions(open_timeout=1.0, backoff_initial=0.01, backoff_max=0.02, max_reconnects=2)
    reader = StreamReader(f"rtsp://127.0.0.1:{free_port()}/cam", options).start()
    wait_for(lambda: reader.state == "failed", 5, "state failed")
    assert reader.stats().reconnects == 2 and "max_reconnects" in (reader.stats().last_error or "")


def test_stop_returns_within_a_second_during_a_hung_open() -> None:
    with socket.socket() as silent:  # accepts TCP connections (backlog) and never answers RTSP
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"rtsp://127.0.0.1:{silent.getsockname()[1]}/cam"
        reader = StreamReader(url, ReaderOptions(open_timeout=2.0, read_timeout=2.0)).start()
        time.sleep(0.3)
        assert reader.state == "connecting"
        start = time.monotonic()
        reader.stop(timeout=1.0)
        assert time.monotonic() - start < 1.3 and reader.state == "stopped"
        assert reader.get(timeout=0.1) is None
        wait_for(lambda: not reader.alive, 4, "the reader thread to exit after its open timeout")
        assert reader.state == "stopped" and reader.stats().frames_read == 0


def test_a_hung_open_does_not_hold_back_other_streams(video_clip: Path) -> None:
    """With the default backend a dead camera's open runs beside other opens (OpenCV's would hold a global lock)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        silent.settimeout(3)
        dead = StreamReader(f"rtsp://127.0.0.1:{silent.getsockname()[1]}/cam", ReaderOptions(open_timeout=4.0))
        with dead, silent.accept()[0]:  # the dead camera's open is under way
            start = time.monotonic()
            with StreamReader(file_url(video_clip), ReaderOptions()) as reader:
                assert reader.get(timeout=5) is not None, reader.stats()
                took = time.monotonic() - start
            assert dead.state == "connecting"  # still inside its 4 s open
    assert took < 1.0, f"the file's first frame waited {took:.2f} s behind the hung open"


# -- source allowlist and redaction --------------------------------------------------------------------------------

ALLOW = ["rtsp://cam1.example", "rtsp://10.0.0.5:8554/live/", "https://video.example/streams", "file:///data/videos"]

ALLOWLIST_CASES = [
    ("rtsp://cam1.example/stream1", True),
    ("RTSP://CAM1.example:554/stream1", True),  # scheme/host case and the default port do not matter
    ("rtsp://user:pw@cam1.example/stream1", True),  # credentials are allowed, and ignored for matching
    ("rtsp://cam1.example", True),
    ("rtsp://cam10.example/x", False),  # prefix must end on a segment boundary
    ("rtsp://cam1.example.evil.net/x", False),
    ("rtsp://cam1.example:8554/x", False),  # another port is another service
    ("rtsp://10.0.0.5:8554/live/a", True),
    ("rtsp://10.0.0.5:8554/liveX", False),
    ("rtsp://10.0.0.5:8554/live/../admin", False),  # dot segments are resolved before matching
    ("https://video.example/streams/a.mjpg", True),
    ("https://video.example/streams/../private", False),
    ("http://video.example/streams/a.mjpg", False),  # scheme is part of the prefix
    ("https://video.example@evil.net/streams/a", False),  # host is evil.net
    ("https://video.example%2f@evil.net/streams", False),
    ("https://a@video.example@evil.net/streams", False),  # two '@'
    ("https://video.example/streams/%2e%2e/private", False),  # encoded dots
    ("https://video.example\\@evil.net/streams", False),  # backslash
    ("https://video.example/streams/a b", False),  # whitespace
    ("file:///data/videos/clip.mp4", True),
    ("file:/data/videos/clip.mp4", True),
    ("file://localhost/data/videos/clip.mp4", True),
    ("file:/data/videos/../../etc/passwd", False),
    ("file:/data/../etc/passwd", False),
    ("file:///data/videos2/clip.mp4", False),
    ("file://otherhost/data/videos/clip.mp4", False),
    ("/data/videos/clip.mp4", False),  # no scheme
    ("ftp://cam1.example/stream1", False),
    ("udp://cam1.example:1234", False),
    ("", False),
]


@pytest.mark.parametrize(("url", "allowed"), ALLOWLIST_CASES)
def test_allowlist(url: str, allowed: bool) -> None:
    assert is_allowed(url, ALLOW) is allowed


def test_empty_allowlist_allows_nothing() -> None:
    assert not is_allowed("rtsp://cam1.example/stream1", [])
    with pytest.raises(SourceNotAllowed, match="ENDOSTREAM_STREAM_ALLOWLIST"):
        validate_source("rtsp://cam1.example/stream1", [])


def test_not_allowed_error_is_redacted_and_names_the_fix() -> None:
    with pytest.raises(SourceNotAllowed) as err:
        validate_source("rtsp://admin:hunter2@cam9.example/live", ALLOW)
    message = str(err.value)
    assert "hunter2" not in message and "rtsp://***@cam9.example/live" in message
    assert "ENDOSTREAM_STREAM_ALLOWLIST" in message and "rtsp://cam9.example/" in message
    with pytest.raises(SourceNotAllowed, match="scheme 'ftp'"):
        validate_source("ftp://cam1.example/x", ALLOW)


def test_symlink_out_of_an_allowed_folder_is_refused(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    (allowed / "link").symlink_to(outside)
    assert is_allowed(file_url(allowed / "clip.mp4"), [file_url(allowed)])
    assert not is_allowed(f"file://{allowed}/link/secret.mp4", [file_url(allowed)])


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://user:pass@cam.example:8554/live", "rtsp://***@cam.example:8554/live"),
        ("rtsp://user@cam.example/live", "rtsp://***@cam.example/live"),
        ("https://cam.example/v.mjpg?user=a&password=b&token=c", "https://cam.example/v.mjpg?user=a&password=***&token=***"),
        ("rtsp://cam.example/live", "rtsp://cam.example/live"),
    ],
)  # fmt: skip
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_normalize_keeps_credentials_only_when_asked() -> None:
    assert normalize("RTSP://u:p@Cam.Example:554//a/./b/") == "rtsp://cam.example/a/b/"
    assert normalize("rtsp://u:p@cam.example/a", keep_credentials=True) == "rtsp://u:p@cam.example/a"


# -- registry ------------------------------------------------------------------------------------------------------


def test_registry_add_list_process_remove(video_clip: Path) -> None:
    port = free_port()  # nothing listens there: a stream that keeps reconnecting
    registry = StreamRegistry([file_url(video_clip.parent), f"rtsp://127.0.0.1:{port}/"])
    try:
        sid = registry.add(file_url(video_clip), ReaderOptions(loop=True))
        with pytest.raises(SourceNotAllowed):
            registry.add("rtsp://user:pw@elsewhere.example/x")
        dead = registry.add(f"rtsp://user:pw@127.0.0.1:{port}/x", ReaderOptions(**FAST))
        frame = registry.get(sid).get(timeout=5)
        assert frame is not None
        registry.mark_processed(sid)
        registry.mark_processed(sid, 2)
        snaps = {s.id: s for s in registry.list()}
        assert list(snaps) == [sid, dead] and len(registry) == 2 and sid in registry
        assert snaps[sid].frames_processed == 3 and snaps[sid].state == "streaming" and snaps[sid].age_s >= 0
        assert snaps[dead].url.startswith("rtsp://***@127.0.0.1:") and "pw" not in snaps[dead].url
        reader = registry.get(sid)
        registry.remove(sid)
        assert reader.state == "stopped" and not reader.alive and sid not in registry
        with pytest.raises(StreamNotFound, match=sid):
            registry.get(sid)
        registry.mark_processed(sid)  # a frame finishing after its stream was removed is not an error
    finally:
        start = time.monotonic()
        registry.close_all()
        assert time.monotonic() - start < 1.5 and len(registry) == 0
