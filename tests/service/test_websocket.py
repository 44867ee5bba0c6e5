"""`/ws/infer` on the real server: results in order, latest-wins dropping under a burst, bad frames answered."""

from __future__ import annotations

import asyncio
import json

import websockets

from tests.service.conftest import encode


def _ws_url(server, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/ws/infer" + query


def test_frames_in_results_out_in_order(server, frames) -> None:
    async def session() -> list[dict]:
        async with websockets.connect(_ws_url(server, "?mask=rle")) as ws:
            results = []
            for frame in frames[:3]:
                await ws.send(encode(frame))
                results.append(json.loads(await ws.recv()))
            return results

    results = asyncio.run(session())
    assert [r["frame"]["id"] for r in results] == [0, 1, 2]
    assert all(r["frame"]["dropped_before"] == 0 for r in results)
    assert all(r["segmentation"]["mask_format"] == "rle" for r in results)


def test_burst_drops_old_frames_and_never_queues(server, frames) -> None:
    burst = 40
    data = encode(frames[3])  # 1080p: decoding is slower than the burst arrives

    async def session() -> list[dict]:
        async with websockets.connect(_ws_url(server)) as ws:
            for _ in range(burst):
                await ws.send(data)
            results = []
            while True:
                try:
                    message = await asyncio.wait_for(ws.recv(), timeout=3.0)
                except TimeoutError:
                    return results
                results.append(json.loads(message))
                if results[-1]["frame"]["id"] == burst - 1:
                    return results

    results = asyncio.run(session())
    ids = [r["frame"]["id"] for r in results]
    assert ids == sorted(ids) and ids[-1] == burst - 1  # in order, and the newest frame is always processed
    assert len(results) < burst  # stale frames were dropped, not queued
    dropped = sum(r["frame"]["dropped_before"] for r in results)
    assert dropped + len(results) == burst  # every frame is either answered or counted as dropped


def test_bad_frame_gets_an_error_and_the_session_continues(server, frames) -> None:
    async def session() -> tuple[dict, dict, dict]:
        async with websockets.connect(_ws_url(server)) as ws:
            await ws.send(b"not an image")
            bad = json.loads(await ws.recv())
            await ws.send("text instead of bytes")
            text = json.loads(await ws.recv())
            await ws.send(encode(frames[0]))
            good = json.loads(await ws.recv())
            return bad, text, good

    bad, text, good = asyncio.run(session())
    assert bad["error"]["code"] == "not_an_image" and bad["frame"]["id"] == 0
    assert text["error"]["code"] == "expected_binary"
    assert good["activity"]["label"] and good["frame"]["id"] == 1


def test_unknown_task_is_refused(server) -> None:
    async def session() -> dict:
        async with websockets.connect(_ws_url(server, "?tasks=depth")) as ws:
            return json.loads(await ws.recv())

    assert asyncio.run(session())["error"]["code"] == "unknown_task"
