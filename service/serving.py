"""Frame inference logic behind the routes: decode + resize -> batched engine -> result.

A frame costs one thread-pool hop before the engine and, usually, none after it:
- the worker thread decodes, resizes and hands the model input to the batcher itself, and the engine thread's
  completion resolves the request's future on the event loop (one wake-up per frame, no hop back in between);
- the result is then built on the event loop, because without full-resolution work it takes tens of microseconds
  (K probabilities, weighted class counts and a model-size mask). Only results that touch every frame pixel
  (`mask_size=frame`, overlays, stream viewers' JPEGs) go back to the pool for that work;
- a frame of a stream, WebSocket connection or HTTP session steps its temporal state (service/temporal.py) while its
  result is built, wherever that is: one small ONNX Runtime call, cheaper than a hop elsewhere would be.
Every stage is timed; what the stages do not cover (thread hand-offs, waiting for a worker, the event loop) is
reported as `unattributed`, so the sum of the parts always equals `total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service import imaging
from service.batcher import Batcher, BatchResult
from service.bundle import Bundle
from service.decoding import CpuDecoder, Decoded, FrameDecoder
from service.errors import BadInput, NotReady
from service.metrics import STAGES, ServiceMetrics
from service.postprocess import InferOptions, Outcome, ResultBuilder, frame_jpeg
from service.temporal import SessionStore, TemporalState, TemporalTracker, Track

__all__ = ["InferOptions", "InferenceService", "Outcome"]


@dataclass
class Timings:
    """Seconds per stage for one frame; `started` is when the service got its bytes (or decoded stream frame)."""

    decode: float = 0.0
    preprocess: float = 0.0
    queue: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    encode: float = 0.0
    temporal: float | None = None  # part of postprocess: the temporal head's steps, when it ran
    started: float = field(default_factory=time.perf_counter)

    def latency(self, batch_size: int, decoder: str) -> dict[str, Any]:
        total = (time.perf_counter() - self.started) * 1000
        ms = {stage: round(getattr(self, stage) * 1000, 3) for stage in STAGES}
        ms["unattributed"] = round(max(total - sum(ms.values()), 0.0), 3)
        ms["total"] = round(total, 3)
        out = {**ms, "batch_size": batch_size, "decoder": decoder}
        if self.temporal is not None:
            out["temporal"] = round(self.temporal * 1000, 3)
        return out


class _Job:
    """One frame on its way through the worker thread and the engine, resolved on the event loop exactly once.

    If the awaiting request goes away first, its engine future is cancelled so the batcher skips the frame.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.done: asyncio.Future[tuple[Decoded, BatchResult]] = loop.create_future()
        self.cancelled = False
        self.batch: Future[BatchResult] | None = None
        self.decoded: Decoded | None = None
        self.done.add_done_callback(self._on_done)

    def _on_done(self, done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            self.cancelled = True
            if self.batch is not None:
                self.batch.cancel()

    def submitted(self, decoded: Decoded, batch: Future[BatchResult]) -> None:
        """Worker thread: the frame is in the batcher; the engine thread resolves the job when it has run."""
        self.decoded, self.batch = decoded, batch
        batch.add_done_callback(lambda _: self._call_soon(self._resolve))

    def failed(self, err: BaseException) -> None:
        self._call_soon(self._fail, err)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed at shutdown: nobody waits any more
            self.loop.call_soon_threadsafe(fn, *args)

    def _resolve(self) -> None:
        assert self.batch is not None and self.decoded is not None
        if self.done.done():
            return
        if self.batch.cancelled():
            self.done.cancel()
        elif (err := self.batch.exception()) is not None:
            self.done.set_exception(err)
        else:
            self.done.set_result((self.decoded, self.batch.result()))

    def _fail(self, err: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(err)


class InferenceService:
    """Runs frames through the batcher and builds results for one bundle."""

    def __init__(
        self,
        bundle: Bundle,
        batcher: Batcher,
        metrics: ServiceMetrics,
        *,
        max_pixels: int,
        workers: int = 4,
        temporal: TemporalTracker | None = None,
        sessions: SessionStore | None = None,
    ):
        self.bundle = bundle
        self.temporal = temporal  # None: no temporal head (or turned off): results are exactly the per-frame ones
        self.sessions = sessions
        self.batcher = batcher
        self.metrics = metrics
        self.max_pixels = max_pixels
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="frames")
        spec = bundle.manifest.input
        self.height, self.width = spec.height, spec.width
        self.results = ResultBuilder(bundle)
        # `use_decoder` swaps in the decoder chosen for the engine (GPU or CPU) once it is open
        self.decoder: FrameDecoder = CpuDecoder(self.height, self.width, max_pixels=max_pixels)
        self._model_ref: dict[str, str] | None = None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def use_decoder(self, decoder: FrameDecoder) -> None:
        self.decoder = decoder

    def validate_tasks(self, tasks: list[str] | None) -> frozenset[str] | None:
        if not tasks:
            return None
        known = {t.name for t in self.bundle.manifest.tasks}
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise BadInput("unknown_task", f"unknown task(s) {unknown}: this model has {sorted(known)}", param="tasks")
        return frozenset(tasks)

    def new_temporal_state(self, source_kind: str) -> TemporalState | None:
        """A fresh temporal state for a stream or WebSocket connection; None when there is no temporal head."""
        return TemporalState(source_kind) if self.temporal is not None else None

    def session_track(self, session: str | None, frame_time: float | None) -> Track | None:
        """Where an HTTP frame of `session` sits in its session's time (client time, else arrival time).

        None without a session, and (a documented no-op) when the bundle has no temporal head.
        """
        if session is None:
            if frame_time is not None:
                raise BadInput(
                    "frame_time_without_session",
                    "a frame time (X-Frame-Time or t) only means something within a session: add X-Session-Id or "
                    "?session=",
                    param="t",
                    value=frame_time,
                )
            return None
        if self.temporal is None or self.sessions is None:
            return None
        state = self.sessions.get(session)
        if frame_time is None:
            return Track(state, time.monotonic(), "arrival")
        return Track(state, frame_time, "source")

    def model_ref(self) -> dict[str, str]:
        """What runs the model, for every result; fixed once the engine is up, so built once."""
        if self._model_ref is not None:
            return self._model_ref
        engine = self.batcher.engine
        m = self.bundle.manifest
        ref = {
            "name": m.name,
            "family": m.family,
            "version": self.bundle.version,
            "backend": engine.backend if engine else "none",
            "device": engine.device if engine else "none",
            "precision": engine.precision if engine else m.precision,
        }
        if engine is not None:
            self._model_ref = ref
        return ref

    # ------------------------------------------------------------------------------------------------ frames
    async def infer_bytes(
        self, data: bytes, options: InferOptions, *, frame_id: int = 0, source: str = "http", track: Track | None = None
    ) -> Outcome:
        """Decode an encoded frame and run it; BadInput for anything that is not a usable image."""
        timings = Timings()
        keep = options.overlay is not None or options.include_frame
        try:
            decoded, batch = await self._through_engine(self._decode, (data, keep, timings), timings)
        except BadInput:
            self.metrics.frames.labels("failed", source).inc()
            self.metrics.rejected.labels("bad_input").inc()
            raise
        frame = {"id": frame_id, "timestamp": None, "captured_at": None, "width": decoded.width,
                 "height": decoded.height, "dropped_before": 0, "frame_jpeg": None}  # fmt: skip
        build = functools.partial(self._build, decoded, batch, frame, options, timings, decoded.frame, track)
        return await self._finish(build, options, timings, source)

    async def infer_array(
        self,
        image: np.ndarray,
        frame: dict[str, Any],
        options: InferOptions,
        *,
        source: str = "stream",
        track: Track | None = None,
    ) -> Outcome:
        """Run an already decoded RGB frame (stream readers decode in their own threads); `frame` is its info."""
        timings = Timings()
        decoded, batch = await self._through_engine(self._resize, (image, timings), timings)
        build = functools.partial(self._build, decoded, batch, frame, options, timings, image, track)
        return await self._finish(build, options, timings, source)

    async def _through_engine(
        self, prepare: Callable[..., Decoded], args: tuple[Any, ...], timings: Timings
    ) -> tuple[Decoded, BatchResult]:
        """`prepare(*args)` in a worker thread, which submits its output to the batcher: one hop to the engine."""
        job = _Job(asyncio.get_running_loop())
        self.batcher.announce()  # a forming batch may wait for this frame while it decodes
        try:
            self.pool.submit(self._prepare_and_submit, job, prepare, args)
        except RuntimeError:  # the pool is shut down: the service is stopping
            self.batcher.arrived()
            raise NotReady("the service is shutting down") from None
        try:
            decoded, batch = await job.done
        except BaseException:
            if not job.done.done():
                job.done.cancel()
            raise
        timings.queue, timings.infer = batch.queue_s, batch.infer_s
        return decoded, batch

    def _prepare_and_submit(self, job: _Job, prepare: Callable[..., Decoded], args: tuple[Any, ...]) -> None:
        try:
            if job.cancelled:
                return
            decoded = prepare(*args)
            job.submitted(decoded, self.batcher.submit(decoded.model_input))
        except BaseException as err:  # BadInput, Overloaded, NotReady: the request's answer
            job.failed(err)
        finally:
            self.batcher.arrived()

    async def _finish(
        self, build: Callable[[], Outcome], options: InferOptions, timings: Timings, source: str
    ) -> Outcome:
        """The result inline on the event loop, or in a worker when it touches every frame pixel."""
        if options.needs_frame_pixels:
            outcome = await asyncio.get_running_loop().run_in_executor(self.pool, build)
        else:
            outcome = build()
        self._observe(timings, source)
        return outcome

    def _observe(self, timings: Timings, source: str) -> None:
        stage = self.metrics.stage_duration
        for name in STAGES:
            if name == "decode" and source == "stream":
                continue  # stream frames are decoded by their reader, outside this pipeline
            stage.labels(name).observe(getattr(timings, name))
        self.metrics.frame_latency.labels(source).observe(time.perf_counter() - timings.started)
        self.metrics.frames.labels("processed", source).inc()

    # --------------------------------------------------------------------------------------- worker threads
    def _decode(self, data: bytes, keep_frame: bool, timings: Timings) -> Decoded:
        decoded = self.decoder.decode(data, keep_frame=keep_frame)
        timings.decode, timings.preprocess = decoded.decode_s, decoded.resize_s
        return decoded

    def _resize(self, image: np.ndarray, timings: Timings) -> Decoded:
        t0 = time.perf_counter()
        resized = imaging.resize_for_model(image, self.height, self.width)
        timings.preprocess = time.perf_counter() - t0
        return Decoded(resized, image.shape[1], image.shape[0], "RGB", "cpu")

    def _build(
        self,
        decoded: Decoded,
        batch: BatchResult,
        frame: dict[str, Any],
        options: InferOptions,
        timings: Timings,
        pixels: np.ndarray | None,
        track: Track | None = None,
    ) -> Outcome:
        """The result from the engine outputs (postprocess), then the mask, overlay or frame encoding (encode)."""
        t0 = time.perf_counter()
        builder = self.results
        height, width = frame["height"], frame["width"]
        activity = builder.activity(batch.outputs, options.tasks)
        temporal = None
        if track is not None and self.temporal is not None:
            # stepped whatever the client asked to see, so the state stays continuous; shown with the activity
            ts = time.perf_counter()
            temporal = self.temporal.observe(track, batch.outputs)
            timings.temporal = time.perf_counter() - ts
        segmentation, mask = builder.segmentation(batch.outputs, options, height, width)
        timings.postprocess = time.perf_counter() - t0
        t1 = time.perf_counter()
        image = None
        raw_mask = None
        if options.overlay and pixels is not None:
            image = builder.overlay(pixels, mask, activity, options.overlay, height, width)
        elif segmentation is not None and mask is not None and options.mask != "none":
            builder.encode_mask(segmentation, mask, options.mask)
            raw_mask = mask if options.mask == "raw" else None
        if options.include_frame and pixels is not None:
            frame["frame_jpeg"] = frame_jpeg(pixels)
        timings.encode = time.perf_counter() - t1
        result: dict[str, Any] = {"frame": frame, "activity": activity}
        if temporal is not None and activity is not None:
            result["activity_temporal"] = temporal
        result["segmentation"] = segmentation
        result["latency_ms"] = timings.latency(batch.batch_size, decoded.device)
        result["model"] = self.model_ref()
        return Outcome(result, raw_mask, image)
