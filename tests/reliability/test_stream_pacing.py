"""A stream with an `fps` limit sleeps until its next frame is due instead of fetching the same frame again and
again (issue 17 #5: an fps=1 stream cost 0.9 core). The stream runs in-process on a real file reader; the engine
is replaced by a stub so the count of buffer polls is all that is measured."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from service.metrics import ServiceMetrics
from service.postprocess import InferOptions
from service.schemas import StreamRequest
from service.settings import Settings
from service.streaming import StreamsApi

FPS = 4.0
SECONDS = 1.5


class _StubService:
    """Answers every frame at once with its id (the stream loop, not the engine, is under test)."""

    async def infer_array(
        self, image: Any, frame: dict, options: InferOptions, *, source: str, track: Any = None
    ) -> SimpleNamespace:
        return SimpleNamespace(json=lambda: json.dumps({"frame": {"id": frame["id"]}}).encode())

    def new_temporal_state(self, source_kind: str) -> None:
        return None  # a bundle without a temporal head


async def _run(api: StreamsApi, source: str) -> tuple[list[dict], int, float]:
    lines = await api.open(StreamRequest(source=source, fps=FPS, max_seconds=SECONDS), InferOptions(mask="none"))
    stream_id = api.registry.list()[0].id
    reader = api.registry.get(stream_id)
    calls = 0
    real_get = reader.get

    def counting_get(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return real_get(*args)

    reader.get = counting_get  # type: ignore[method-assign]
    started = time.process_time()
    out = [json.loads(line) async for line in lines]
    return out, calls, time.process_time() - started


def test_fps_limit_sleeps_between_frames(video_clip: Path) -> None:
    settings = Settings(stream_allowlist=[f"file:{video_clip.parent}/"])
    api = StreamsApi(settings, _StubService(), ServiceMetrics())  # type: ignore[arg-type]
    try:
        lines, calls, cpu_s = asyncio.run(_run(api, f"file:{video_clip}"))
    finally:
        api.close()
    frames = [line for line in lines if "frame" in line]
    assert lines[-1]["end"]["reason"] == "max_seconds"
    assert FPS * SECONDS - 2 <= len(frames) <= FPS * SECONDS + 1, len(frames)  # the limit still holds
    print(f"fps={FPS:g} for {SECONDS:g} s: {len(frames)} frames, {calls} buffer polls, {cpu_s:.2f} s CPU")
    # one poll per frame, plus a few timed-out 0.25 s polls; a busy loop makes thousands
    assert calls <= 2 * len(frames) + 8, f"{calls} polls for {len(frames)} frames: the stream loop is spinning"
