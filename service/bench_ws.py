"""`endostream bench ws`: a capture box's view of `/ws/infer`: frames pushed at a fixed rate, latency per frame.

One WebSocket session sends encoded frames on a fixed schedule (frame i is due at start + i / fps; a late send does
not shift the later ones, as a camera would not wait) and times each frame from its send to its result. A frame the
service skipped to stay live (latest frame wins) gets no result: it is counted as dropped and as a miss of the frame
period, so the share "within one frame period" is over every frame sent, not only the answered ones. The first
`warmup` frames are sent and answered but left out of the figures. Client and service share the machine; the JSON
records how late the client itself sent (`send_lag_ms`), so a client that could not keep the pace is visible.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.bench import percentiles
from service.launcher import ServiceProcess

logger = logging.getLogger(__name__)

DRAIN_S = 10.0  # after the last send, how long to wait for its result before calling the rest dropped


@dataclass
class Session:
    """What one paced session saw, on the client's clock (perf_counter seconds)."""

    sent_at: dict[int, float] = field(default_factory=dict)  # frame id -> send time
    answered_at: dict[int, float] = field(default_factory=dict)  # frame id -> result time
    server_ms: dict[int, dict[str, float]] = field(default_factory=dict)  # frame id -> the result's latency_ms
    errors: dict[int, str] = field(default_factory=dict)  # frame id -> error code
    send_lag: list[float] = field(default_factory=list)  # seconds each send was behind its schedule
    seconds: float = 0.0


WS_POINTS = (50, 90, 99, 99.9)  # a stream's tail: p99.9 is one frame in 33 s at 30 fps


def summarize(session: Session, fps: float, warmup: int) -> dict[str, Any]:
    """Latency, drops and the share within one frame period over the frames after `warmup`."""
    period_ms = 1000.0 / fps
    ids = sorted(i for i in session.sent_at if i >= warmup)
    answered = [i for i in ids if i in session.answered_at]
    latencies = [(session.answered_at[i] - session.sent_at[i]) * 1000 for i in answered]
    within = sum(1 for ms in latencies if ms <= period_ms)
    errors = [i for i in ids if i in session.errors]
    dropped = len(ids) - len(answered) - len(errors)
    stages: dict[str, list[float]] = {}
    for i in answered:
        for stage, ms in session.server_ms[i].items():
            if isinstance(ms, int | float):
                stages.setdefault(stage, []).append(float(ms))
    return {
        "frames": len(ids),
        "answered": len(answered),
        "dropped": dropped,
        "errors": len(errors),
        "error_codes": sorted({session.errors[i] for i in errors}),
        "frame_period_ms": round(period_ms, 3),
        "latency_ms": percentiles(latencies, WS_POINTS),
        # strict: a dropped or failed frame is a miss; "of answered" is the same over answered frames only
        "within_frame_period": round(within / len(ids), 6) if ids else 0.0,
        "within_frame_period_of_answered": round(within / len(answered), 6) if answered else 0.0,
        "server_latency_mean_ms": {k: round(float(np.mean(v)), 3) for k, v in stages.items()},
        "send_lag_ms": percentiles([lag * 1000 for lag in session.send_lag[warmup:]], WS_POINTS),
        "achieved_fps": round(len(answered) / session.seconds, 2) if session.seconds else 0.0,
    }


async def _paced_session(url: str, frames: Sequence[bytes], total: int, fps: float, mask: str) -> Session:
    """Send `total` frames at `fps` over one WebSocket and collect every result."""
    from websockets.asyncio.client import connect

    session = Session()
    last = total - 1
    done = asyncio.Event()

    async with connect(f"{url}/ws/infer?mask={mask}", max_size=None, compression=None) as ws:

        async def receive() -> None:
            async for message in ws:
                now = time.perf_counter()
                item = json.loads(message)
                frame_id = item.get("frame", {}).get("id")
                if frame_id is None:  # a session-level error (not ready, bad option): nothing more will come
                    raise RuntimeError(f"/ws/infer refused the session: {item}")
                if "error" in item:
                    session.errors[frame_id] = item["error"].get("code", "error")
                else:
                    session.answered_at[frame_id] = now
                    session.server_ms[frame_id] = item.get("latency_ms", {})
                if frame_id == last:  # the newest frame is never replaced, so it is always answered
                    done.set()

        receiver = asyncio.create_task(receive())
        start = time.perf_counter() + 0.05
        for i in range(total):
            due = start + i / fps
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if receiver.done():
                receiver.result()  # re-raise what stopped the receiver
            session.sent_at[i] = time.perf_counter()
            session.send_lag.append(max(0.0, session.sent_at[i] - due))
            await ws.send(frames[i % len(frames)])
        try:
            await asyncio.wait_for(done.wait(), DRAIN_S)
        except TimeoutError:
            logger.warning("no result for the last frame %.0f s after it was sent", DRAIN_S)
        session.seconds = time.perf_counter() - start
        receiver.cancel()
        try:
            await receiver
        except asyncio.CancelledError:
            pass
    return session


def bench_ws(
    bundle: Path,
    frames: Sequence[bytes],
    *,
    count: int = 3000,
    fps: float = 30.0,
    warmup: int = 30,
    mask: str = "png",
    env: Mapping[str, str] | None = None,
    log_dir: Path = Path("endostream-work/bench-logs"),
) -> dict[str, Any]:
    """Start the service on `bundle` (with `env` on top of this environment) and push `count` frames at `fps`.

    Raises:
        ValueError: a count, rate or warm-up that cannot give a figure.
    """
    if count < 1 or fps <= 0 or warmup < 0:
        raise ValueError(f"need count >= 1, fps > 0 and warmup >= 0; got count={count}, fps={fps}, warmup={warmup}")
    if not frames:
        raise ValueError("no frames to send: pass at least one encoded frame")
    with ServiceProcess(bundle, env=env).start(log_dir) as server:
        logger.info("pushing %d frames (+%d warm-up) at %.1f fps to %s/ws/infer", count, warmup, fps, server.url)
        session = asyncio.run(_paced_session(server.url.replace("http", "ws", 1), frames, warmup + count, fps, mask))
    report = summarize(session, fps, warmup)
    return {
        "bundle": str(bundle),
        "fps": fps,
        "warmup": warmup,
        "mask": mask,
        "frame_bytes_mean": int(np.mean([len(f) for f in frames])),
        "env": dict(env or {}),
        **report,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }


def format_ws(report: dict[str, Any]) -> str:
    lat = report["latency_ms"]
    return (
        f"{report['frames']} frames at {report['fps']:g} fps: latency p50 {lat.get('p50')} / p99 {lat.get('p99')} / "
        f"max {lat.get('max')} ms, {100 * report['within_frame_period']:.2f} % within {report['frame_period_ms']} ms, "
        f"{report['dropped']} dropped, {report['errors']} errors"
    )
