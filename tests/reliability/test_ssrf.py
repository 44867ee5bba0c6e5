"""SSRF through FFmpeg: an allowlisted origin that redirects, or serves HLS playlists naming another host, must
never make the service connect to that host (the sink counts every TCP connection; it must see none); a playlist
file in an allowlisted folder must not lead to a clip outside it (no frame may come out).

The control test opens the same sources with FFmpeg's defaults and must reach the sink and the outside clip: it
proves the origin really redirects and the playlists are really followed, so a zero elsewhere means the policy held.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import httpx
import pytest

from service.streams.backends import SourceError, open_source
from tests.reliability import START_S
from tests.reliability.loopback import HttpOrigin, Sink, hls_playlist, redirect_to, serve_bytes
from tests.service.server import ServerProcess

HLS = "application/vnd.apple.mpegurl"
HTTP_CASES = ("/redirect-302", "/redirect-301", "/redirect-scheme-relative", "/live.m3u8", "/master.m3u8")
FILE_CASES = ("playlist.m3u8", "list.ffconcat")


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    sink = Sink()
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def origin(sink: Sink) -> Iterator[HttpOrigin]:
    target = f"127.0.0.1:{sink.port}"
    origin = HttpOrigin(
        {
            "/redirect-302": redirect_to(f"http://{target}/camera"),
            "/redirect-301": redirect_to(f"http://{target}/camera", status=301),
            "/redirect-scheme-relative": redirect_to(f"//{target}/camera", status=307),
            "/live.m3u8": serve_bytes(hls_playlist(f"http://{target}/seg0.ts", f"http://{target}/seg1.ts"), HLS),
            "/master.m3u8": serve_bytes(hls_playlist(f"http://{target}/variant.m3u8"), HLS),
        }
    )
    yield origin
    origin.close()


@pytest.fixture(scope="module")
def playlists(video_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Playlist files in an allowlisted folder that name a clip outside it (a local-file escape)."""
    folder = tmp_path_factory.mktemp("playlists")
    outside = video_clip.resolve()
    (folder / "playlist.m3u8").write_bytes(hls_playlist(str(outside)))
    (folder / "list.ffconcat").write_text(f"ffconcat version 1.0\nfile {outside}\n")
    return folder


def _sources(origin: HttpOrigin, playlists: Path) -> list[str]:
    return [origin.url + p for p in HTTP_CASES] + [f"file://{playlists / name}" for name in FILE_CASES]


def test_control_ffmpeg_defaults_do_follow(origin: HttpOrigin, sink: Sink, playlists: Path) -> None:
    reached = {}
    for path in ("/redirect-302", "/live.m3u8"):
        before = sink.hits
        try:
            av.open(origin.url + path, timeout=(1.0, 1.0)).close()
        except (av.FFmpegError, OSError):
            pass  # the sink answers nothing: the open fails after it connected, which is what we count
        reached[path] = sink.hits > before
    for name, options in (("playlist.m3u8", {}), ("list.ffconcat", {"safe": "0"})):
        with av.open(str(playlists / name), options=options) as container:
            reached[name] = next(container.decode(video=0), None) is not None
    assert all(reached.values()), f"control: FFmpeg's defaults did not follow {reached}; the test proves nothing"


@pytest.mark.parametrize("backend", ["pyav", "opencv"])
def test_readers_open_nothing_outside_the_allowed_url(
    backend: str, origin: HttpOrigin, sink: Sink, playlists: Path
) -> None:
    before = sink.hits
    for url in _sources(origin, playlists):
        target = url.removeprefix("file://")
        with pytest.raises(SourceError):
            open_source(target, label=url, backend=backend, open_timeout=1.0, read_timeout=1.0, network=target == url)
    time.sleep(0.2)  # a connection still on its way would be counted now
    assert sink.hits == before, f"{sink.hits - before} connection(s) reached the sink through {backend}"


def test_service_streams_never_reach_the_sink(
    origin: HttpOrigin, sink: Sink, playlists: Path, endoarss_bundle: Path, tmp_path: Path
) -> None:
    env = {
        "ENDOSTREAM_STREAM_ALLOWLIST": f"{origin.url}/,file://{playlists}/",
        "ENDOSTREAM_STREAM_OPEN_TIMEOUT_S": "1",
        "ENDOSTREAM_STREAM_READ_TIMEOUT_S": "1",
    }
    before = sink.hits
    with ServerProcess(endoarss_bundle, env=env).start(tmp_path, timeout=START_S) as service:

        def stream(url: str) -> list[dict]:
            body = {"source": url, "max_seconds": 8}
            with httpx.stream("POST", f"{service.url}/infer", json=body, timeout=20) as reply:
                assert reply.status_code == 200, reply.read()
                return [json.loads(line) for line in reply.iter_lines() if line]

        sources = _sources(origin, playlists)
        with ThreadPoolExecutor(len(sources)) as pool:  # all at once: each waits for three failed opens
            results = dict(zip(sources, pool.map(stream, sources), strict=True))
        for url, lines in results.items():
            assert lines[-1]["end"]["reason"] == "unreachable", (url, lines[-1])
            assert not any("activity" in line for line in lines), f"{url}: frames came from outside the allowlist"
        # the sink's host is not allowlisted at all: asked for directly, it is refused before anything opens
        refused = httpx.post(f"{service.url}/infer", json={"source": f"{sink.url}/camera"}, timeout=10)
        assert refused.status_code == 403
    assert sink.hits == before, f"{sink.hits - before} connection(s) reached the sink"
    print(f"SSRF: {len(_sources(origin, playlists))} redirecting/playlist sources, sink hits {sink.hits - before}")
