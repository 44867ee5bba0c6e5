"""Two real RTSP cameras (GStreamer servers, different clips) read at once through the real service on a bundle with a
temporal head: every result carries both answers, each stream's temporal answer is exactly what its own frames give
(so no state leaks between the streams), time advances by the streams' PTS, and a stream opened again starts fresh.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.rtsp import CLIP_FPS, CLIP_SECONDS, CLIP_SIZE, RtspServer, ensure_h264, rtsp_unavailable
from tests.service.server import ServerProcess
from tests.service.temporal_bundle import ALPHA, FIELD, INTERVAL, ema_reference

RESET_S = 10.0  # the service default
FRAMES = 30

pytestmark = pytest.mark.timeout(180)


def _clip(folder: Path, seed: int) -> Path:
    from training.data.writer import write_clip

    write_clip(folder, 0, seed=seed, seconds=CLIP_SECONDS, fps=CLIP_FPS, size=CLIP_SIZE, gop=10)
    return ensure_h264(folder / "clip_000.mp4")


@pytest.fixture
def cameras(tmp_path: Path) -> Iterator[tuple[RtspServer, RtspServer]]:
    reason = rtsp_unavailable()
    if reason:
        pytest.skip(reason)
    first = RtspServer(_clip(tmp_path / "a", seed=3), name="left").start()
    second = RtspServer(_clip(tmp_path / "b", seed=11), name="right").start()
    yield first, second
    first.close()
    second.close()


def _read(url: str, source: str, out: list[dict]) -> None:
    with httpx.stream("POST", f"{url}/infer", json={"source": source, "max_frames": FRAMES}, timeout=60) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line:
                out.append(json.loads(line))


def _vector(probabilities: dict[str, float]) -> np.ndarray:
    return np.array(list(probabilities.values()))


def _expected_steps(times: list[float]) -> list[tuple[int, bool]]:
    """(head steps, reset?) per frame by the stepping rule, from the frames' times alone."""
    out: list[tuple[int, bool]] = []
    last_step = last = math.nan
    for t in times:
        if math.isnan(last_step) or abs(t - last_step) > RESET_S or t < last:
            out.append((1, True))
            last_step = last = t
            continue
        last = t
        k = int((t - last_step) / INTERVAL + 1e-9)
        if k >= 1:
            last_step += k * INTERVAL
        out.append((min(k, FIELD) if k >= 1 else 0, False))
    return out


def _replay(results: list[dict]) -> None:
    """Recompute every temporal answer from this stream's own per-frame probabilities and the reported steps."""
    ema: np.ndarray | None = None
    previous: np.ndarray | None = None
    for result in results:
        x = _vector(result["activity"]["probabilities"])
        temporal = result["activity_temporal"]
        if temporal["reset"]:
            ema = ema_reference([x], ALPHA)
        elif temporal["stepped"]:
            assert ema is not None and previous is not None
            ema = ema_reference([ema] + [previous] * temporal["held"] + [x], ALPHA)
        np.testing.assert_allclose(_vector(temporal["probabilities"]), ema, atol=5e-5)
        previous = x


def test_two_rtsp_streams_at_once_keep_their_own_temporal_state(
    cameras: tuple[RtspServer, RtspServer], temporal_bundle: Path, tmp_path: Path
) -> None:
    left, right = cameras
    env = {
        "ENDOSTREAM_STREAM_ALLOWLIST": f"rtsp://127.0.0.1:{left.port}/,rtsp://127.0.0.1:{right.port}/",
        "ENDOSTREAM_STREAM_OPEN_TIMEOUT_S": "5",
    }
    service = ServerProcess(temporal_bundle, env=env).start(tmp_path)
    try:
        lines: dict[str, list[dict]] = {"left": [], "right": []}
        readers = [
            threading.Thread(target=_read, args=(service.url, camera.url, lines[name]), daemon=True)
            for name, camera in (("left", left), ("right", right))
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(90)
        results = {
            name: [item for item in items if "frame" in item and "error" not in item] for name, items in lines.items()
        }
        for name, items in lines.items():
            assert items[-1].get("end", {}).get("reason") == "max_frames", (name, items[-3:])
            assert len(results[name]) == FRAMES, name

        # the two cameras show different scenes: a temporal state shared between them would be visible below
        gap = np.mean(
            [
                np.abs(_vector(a["activity"]["probabilities"]) - _vector(b["activity"]["probabilities"])).max()
                for a, b in zip(results["left"], results["right"], strict=True)
            ]
        )
        assert gap > 1e-3, f"the two clips give the same per-frame answers (mean max gap {gap}): no leak test"

        for name, items in results.items():
            assert all("activity" in r and "activity_temporal" in r for r in items), name
            first = items[0]["activity_temporal"]
            assert first["reset"] and first["steps"] == 1, (name, first)
            times = [
                r["frame"]["timestamp"] if r["frame"]["timestamp"] is not None else r["frame"]["captured_at"]
                for r in items
            ]
            reported = [(r["activity_temporal"]["stepped"], r["activity_temporal"]["reset"]) for r in items]
            assert reported == _expected_steps(times), name  # time advances by the stream's own clock
            assert any(s == 0 for s, _ in reported) or any(r["activity_temporal"]["held"] for r in items), name
            _replay(items)
            assert items[-1]["activity_temporal"]["steps"] >= 3, name

        # the stream ends with its request; the same camera opened again starts from a fresh state
        again: list[dict] = []
        _read(service.url, left.url, again)
        fresh = next(item for item in again if "frame" in item and "error" not in item)
        assert fresh["activity_temporal"]["reset"] and fresh["activity_temporal"]["steps"] == 1
        np.testing.assert_allclose(
            _vector(fresh["activity_temporal"]["probabilities"]), _vector(fresh["activity"]["probabilities"]), atol=1e-5
        )
        _replay([item for item in again if "frame" in item and "error" not in item])
        assert httpx.get(f"{service.url}/streams").json() == []  # nothing of either stream is left behind
    finally:
        service.stop()
