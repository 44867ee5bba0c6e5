"""Live sources through the engine: `POST /infer` with a `source` opens a reader, and each processed frame becomes
one NDJSON line until the source ends, a limit is hit, the stream is deleted, or the client disconnects.

A stream is processed one frame at a time (batch 1: batching would add a frame period of latency); the reader keeps
decoding into its single-slot buffer meanwhile, so the next frame processed is always the newest one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from service.errors import BadInput, Forbidden, NotReady, ServiceError, TooManyStreams
from service.metrics import ServiceMetrics
from service.schemas import StreamInfo, StreamRequest
from service.serving import InferenceService, InferOptions
from service.settings import Settings
from service.streams.reader import FINAL_STATES, ReaderOptions
from service.streams.registry import StreamNotFound, StreamRegistry
from service.streams.registry import TooManyStreams as RegistryFull
from service.streams.sources import SourceNotAllowed
from service.temporal import Track

logger = logging.getLogger(__name__)

POLL_S = 0.25  # how often a waiting stream loop looks at its limits and at the client
UNREACHABLE_AFTER = 3  # failed opens before the first frame after which the request ends with an error line


class _MetricsListener:
    """Reader events -> Prometheus series of that stream."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def on_frame(self, stream_id: str) -> None:
        pass

    def on_drop(self, stream_id: str, reason: str) -> None:
        self.metrics.frames.labels("dropped", "stream").inc()
        self.metrics.dropped.labels(reason, "stream").inc()

    def on_reconnect(self, stream_id: str) -> None:
        self.metrics.reconnects.labels(stream_id).inc()

    def on_state(self, stream_id: str, state: str) -> None:
        self.metrics.stream_up.labels(stream_id).set(1.0 if state == "streaming" else 0.0)


class StreamsApi:
    """Opens, runs, lists and stops stream sources for the routes."""

    def __init__(self, settings: Settings, service: InferenceService, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.service = service
        self.metrics = metrics
        self.registry = StreamRegistry(
            settings.stream_allowlist,
            listener=_MetricsListener(metrics),
            max_streams=settings.max_streams,
            default_options=ReaderOptions(
                backend=settings.stream_backend,
                open_timeout=settings.stream_open_timeout_s,
                read_timeout=settings.stream_read_timeout_s,
                backoff_initial=min(0.5, settings.stream_backoff_max_s),
                backoff_max=settings.stream_backoff_max_s,
            ),
        )
        # Each stream waits for its next frame in a thread of this pool, one at a time, so max_streams threads mean
        # no stream ever queues behind another (asyncio.to_thread's shared default pool has cpu+4 threads: seven
        # dead cameras polling there held back a live stream to 8 fps).
        self._waits = ThreadPoolExecutor(settings.max_streams, thread_name_prefix="stream-wait")
        self._closing = threading.Event()

    def drain(self) -> None:
        """Shutdown begins: every stream ends with its final line (reason "shutdown"); new ones are refused."""
        self._closing.set()
        for snapshot in self.registry.list():
            with contextlib.suppress(StreamNotFound):
                self.registry.remove(snapshot.id, timeout=0)

    def close(self) -> None:
        self._closing.set()
        self.registry.close_all()
        self._waits.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> list[StreamInfo]:
        # The registry's snapshots are already redacted and rounded; the schema has the same fields.
        return [StreamInfo(**dataclasses.asdict(s)) for s in self.registry.list()]

    def stop(self, stream_id: str) -> bool:
        """Stop a stream; False when no stream has this id."""
        try:  # timeout=0: signal the reader and return; joining it here would block the event loop (~1 s)
            self.registry.remove(stream_id, timeout=0)
        except StreamNotFound:
            return False
        return True

    def refresh_gauges(self) -> None:
        """Point-in-time gauges, refreshed when Prometheus scrapes."""
        snapshots = self.registry.list()
        self.metrics.streams_active.set(len(snapshots))
        for snap in snapshots:
            self.metrics.stream_fps.labels(snap.id).set(snap.fps)
        if self.service.sessions is not None:
            self.service.sessions.refresh()
        batcher = self.service.batcher
        self.metrics.ready.set(1.0 if batcher.ready else 0.0)
        engine = batcher.engine
        if engine is not None:
            m = self.service.bundle.manifest
            self.metrics.model_info.labels(
                m.name, m.family, self.service.bundle.version, engine.backend, engine.device, engine.precision
            ).set(1)
            self.metrics.engine_warmup.set(batcher.startup_seconds)

    async def open(self, request: StreamRequest, options: InferOptions) -> AsyncIterator[bytes]:
        """Check the source and start its reader (errors here become a normal JSON error reply), then stream."""
        if self._closing.is_set():
            raise NotReady("the service is shutting down; open the stream again in a moment (or on another instance)")
        try:
            stream_id = self.registry.add(request.source)
        except RegistryFull as err:
            self.metrics.rejected.labels("too_many_streams").inc()
            raise TooManyStreams(str(err)) from None
        except SourceNotAllowed as err:
            self.metrics.rejected.labels("forbidden_source").inc()
            raise Forbidden("source_not_allowed", str(err), param="source") from None
        except ValueError as err:
            raise BadInput("bad_source", str(err), param="source") from None
        for series in (self.metrics.reconnects, self.metrics.frame_age):  # exist at 0 so rate()/increase() see the
            series.labels(stream_id)  # first reconnect and the first frames
        self.metrics.stream_up.labels(stream_id).set(0)
        live = InferOptions(
            mask=options.mask, mask_size=options.mask_size, tasks=options.tasks, include_frame=request.include_frame
        )
        return self._lines(stream_id, request, live)

    async def _lines(self, stream_id: str, request: StreamRequest, options: InferOptions) -> AsyncIterator[bytes]:
        reader = self.registry.get(stream_id)
        started = time.monotonic()
        produced = 0
        last_index = -1
        next_due = 0.0
        period = 1.0 / request.fps if request.fps else 0.0
        reason = "ended"
        loop = asyncio.get_running_loop()
        # this stream's temporal state: it lives and dies with this generator, so no other stream sees it and a
        # stream opened again starts fresh
        temporal = self.service.new_temporal_state("stream")
        try:
            while True:
                if self._closing.is_set():
                    reason = "shutdown"
                    break
                if request.max_frames is not None and produced >= request.max_frames:
                    reason = "max_frames"
                    break
                if request.max_seconds is not None and time.monotonic() - started >= request.max_seconds:
                    reason = "max_seconds"
                    break
                wait = next_due - time.monotonic()
                if wait > 0:  # over the requested rate: sleep until the next frame is due, then take the newest
                    await asyncio.sleep(min(wait, POLL_S))
                    continue
                frame = await loop.run_in_executor(self._waits, reader.get, POLL_S, last_index)
                if frame is None:
                    stats = reader.stats()
                    if stats.state in FINAL_STATES:  # a reader stopped by drain() ends the stream for shutdown
                        reason = "shutdown" if self._closing.is_set() else stats.state
                        break
                    if produced == 0 and stats.frames_read == 0 and stats.consecutive_failures >= UNREACHABLE_AFTER:
                        reason = "unreachable"  # a live source that never answered: tell the client, do not hang
                        break
                    continue
                next_due = time.monotonic() + period
                dropped = frame.index - last_index - 1 if last_index >= 0 else frame.index
                last_index = frame.index
                info = {
                    "id": frame.index,
                    "timestamp": frame.pts,
                    "captured_at": frame.captured_at,
                    "width": frame.image.shape[1],
                    "height": frame.image.shape[0],
                    "dropped_before": max(dropped, 0),
                    "frame_jpeg": None,
                }
                track = None
                if temporal is not None:  # source time: the stream's PTS, else when the reader decoded the frame
                    track = (
                        Track(temporal, frame.pts, "source")
                        if frame.pts is not None
                        else Track(temporal, frame.captured_at, "arrival")
                    )
                try:
                    outcome = await self.service.infer_array(frame.image, info, options, source="stream", track=track)
                except ServiceError as err:
                    yield _line({**err.body(), "frame": {"id": frame.index}})
                    continue
                self.metrics.frame_age.labels(stream_id).observe(time.time() - frame.captured_at)
                self.registry.mark_processed(stream_id)
                produced += 1
                yield outcome.json() + b"\n"
            stats = reader.stats()
            end: dict[str, Any] = {"end": {"reason": reason, "stream": stream_id, "frames": produced}}
            if reason in ("failed", "unreachable"):
                end["error"] = {
                    "code": f"stream_{reason}",
                    "message": f"{stats.last_error or 'no frames'} ({stats.consecutive_failures} failed attempts)",
                    "param": "source",
                }
            yield _line(end)
        finally:  # also runs when the client disconnects (the generator is closed): the reader stops at once
            with contextlib.suppress(StreamNotFound):  # already gone after DELETE /streams/{id}
                self.registry.remove(stream_id, timeout=0)  # never block the event loop on the reader thread
            self.metrics.forget_stream(stream_id)


def _line(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body) + b"\n"
