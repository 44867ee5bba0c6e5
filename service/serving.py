"""Frame inference logic behind the routes: decode -> preprocess -> batched engine -> postprocess -> encode.

Every CPU-heavy step runs in a thread pool, never on the event loop; every step is timed, and the timings go both
into the result (`latency_ms`) and into the per-stage Prometheus histogram.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service import imaging
from service.batcher import Batcher, BatchResult
from service.bundle import Bundle
from service.errors import BadInput
from service.metrics import ServiceMetrics
from service.schemas import (
    ActivityResult,
    ClassPresence,
    FrameInfo,
    InferResult,
    Latency,
    MaskFormat,
    ModelRef,
    RunLengths,
    SegmentationResult,
)


@dataclass(frozen=True)
class InferOptions:
    """What the client asked for: mask encoding, which tasks to return, an overlay image instead of JSON."""

    mask: MaskFormat = "png"
    tasks: frozenset[str] | None = None  # None: every task of the bundle
    overlay: str | None = None  # "png" | "jpeg": return the annotated frame
    include_frame: bool = False  # add the (JPEG) source frame to the JSON (viewer of a stream)


@dataclass
class Timings:
    """Seconds per stage for one frame."""

    decode: float = 0.0
    preprocess: float = 0.0
    queue: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    encode: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def latency(self, batch_size: int) -> Latency:
        total = time.perf_counter() - self.started
        ms = {k: round(getattr(self, k) * 1000, 3) for k in ("decode", "preprocess", "queue", "infer", "postprocess")}
        return Latency(**ms, encode=round(self.encode * 1000, 3), total=round(total * 1000, 3), batch_size=batch_size)


@dataclass(frozen=True)
class Outcome:
    """A processed frame: the JSON result, and the overlay image when one was asked for."""

    result: InferResult
    image: bytes | None = None


class InferenceService:
    """Runs frames through the batcher and builds results for one bundle."""

    def __init__(self, bundle: Bundle, batcher: Batcher, metrics: ServiceMetrics, *, max_pixels: int, workers: int = 4):
        self.bundle = bundle
        self.batcher = batcher
        self.metrics = metrics
        self.max_pixels = max_pixels
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="frames")
        spec = bundle.manifest.input
        self.height, self.width = spec.height, spec.width
        self.activity_task = bundle.task_of_kind("classification")
        self.segmentation_task = bundle.task_of_kind("segmentation")
        seg = self.segmentation_task
        self.palette = imaging.palette(seg.colors, len(seg.classes)) if seg else None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def validate_tasks(self, tasks: list[str] | None) -> frozenset[str] | None:
        if not tasks:
            return None
        known = {t.name for t in self.bundle.manifest.tasks}
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise BadInput("unknown_task", f"unknown task(s) {unknown}: this model has {sorted(known)}", param="tasks")
        return frozenset(tasks)

    def model_ref(self) -> ModelRef:
        engine = self.batcher.engine
        m = self.bundle.manifest
        return ModelRef(
            name=m.name,
            family=m.family,
            version=self.bundle.version,
            backend=engine.backend if engine else "none",
            device=engine.device if engine else "none",
            precision=engine.precision if engine else m.precision,
        )

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ------------------------------------------------------------------------------------------------ frames
    async def infer_bytes(
        self, data: bytes, options: InferOptions, *, frame_id: int = 0, source: str = "http"
    ) -> Outcome:
        """Decode an encoded frame and run it; BadInput for anything that is not a usable image."""
        timings = Timings()
        with self.batcher.expect():
            try:
                decoded, model_input = await self._run(self._decode_and_resize, data, timings)
            except BadInput:
                self.metrics.frames.labels("failed", source).inc()
                self.metrics.rejected.labels("bad_input").inc()
                raise
            future = self.batcher.submit(model_input)
        info = FrameInfo(id=frame_id, width=decoded.width, height=decoded.height)
        frame = decoded.image if options.overlay or options.include_frame else None
        return await self._finish(future, info, options, timings, source, frame)

    async def infer_array(
        self, image: np.ndarray, info: FrameInfo, options: InferOptions, *, source: str = "stream"
    ) -> Outcome:
        """Run an already decoded RGB frame (stream readers decode in their own threads)."""
        timings = Timings()
        with self.batcher.expect():
            model_input = await self._run(self._resize, image, timings)
            future = self.batcher.submit(model_input)
        return await self._finish(future, info, options, timings, source, image)

    async def _finish(
        self, future: Any, info: FrameInfo, options: InferOptions, timings: Timings, source: str, frame: Any
    ) -> Outcome:
        try:
            batch: BatchResult = await asyncio.wrap_future(future)
        except Exception:
            self.metrics.frames.labels("failed", source).inc()
            raise
        timings.queue, timings.infer = batch.queue_s, batch.infer_s
        outcome = await self._run(self._postprocess_and_encode, batch, info, options, timings, frame)
        self._observe(timings, source)
        return outcome

    def _observe(self, timings: Timings, source: str) -> None:
        stage = self.metrics.stage_duration
        for name in ("decode", "preprocess", "queue", "infer", "postprocess", "encode"):
            if name == "decode" and source == "stream":
                continue  # stream frames are decoded by their reader, outside this pipeline
            stage.labels(name).observe(getattr(timings, name))
        self.metrics.frame_latency.labels(source).observe(time.perf_counter() - timings.started)
        self.metrics.frames.labels("processed", source).inc()

    # --------------------------------------------------------------------------------------- worker threads
    def _decode_and_resize(self, data: bytes, timings: Timings) -> tuple[imaging.DecodedFrame, np.ndarray]:
        t0 = time.perf_counter()
        decoded = imaging.decode_image(data, max_pixels=self.max_pixels, min_size=(self.height, self.width))
        timings.decode = time.perf_counter() - t0
        return decoded, self._resize(decoded.image, timings)

    def _resize(self, image: np.ndarray, timings: Timings) -> np.ndarray:
        t0 = time.perf_counter()
        resized = imaging.resize_for_model(image, self.height, self.width)
        timings.preprocess = time.perf_counter() - t0
        return resized

    def _postprocess_and_encode(
        self, batch: BatchResult, info: FrameInfo, options: InferOptions, timings: Timings, frame: np.ndarray | None
    ) -> Outcome:
        t0 = time.perf_counter()
        wanted = options.tasks
        activity = None
        act = self.activity_task
        if act is not None and (wanted is None or act.name in wanted):
            probs = batch.outputs[act.output].astype(float)
            index = int(probs.argmax())
            activity = ActivityResult(
                task=act.name,
                label=act.classes[index],
                index=index,
                confidence=round(float(probs[index]), 6),
                probabilities={c: round(float(p), 6) for c, p in zip(act.classes, probs, strict=True)},
            )
        mask = None
        seg = self.segmentation_task
        seg_result = None
        if seg is not None and (wanted is None or seg.name in wanted):
            small = batch.outputs[seg.output]
            mask = imaging.resize_mask(small, info.height, info.width)
            fractions = imaging.class_fractions(small, len(seg.classes), info.height, info.width)
            present = [
                ClassPresence(index=int(i), name=seg.classes[i], fraction=round(float(fractions[i]), 6))
                for i in np.argsort(-fractions)
                if fractions[i] > 0
            ]
            seg_result = SegmentationResult(
                task=seg.name, height=info.height, width=info.width, classes=present, mask_format="none"
            )
        timings.postprocess = time.perf_counter() - t0
        t1 = time.perf_counter()
        image = None
        if options.overlay and frame is not None:
            label = f"{activity.label} {activity.confidence:.0%}" if activity else None
            full = (
                frame
                if frame.shape[:2] == (info.height, info.width)
                else imaging.resize_for_model(frame, info.height, info.width)
            )
            image = imaging.encode_image(imaging.draw_overlay(full, mask, self.palette, label), options.overlay)
        elif seg_result is not None and mask is not None and options.mask != "none":
            seg_result.mask_format = options.mask
            seg_result.mask = (
                imaging.encode_mask_png(mask) if options.mask == "png" else RunLengths(**imaging.encode_mask_rle(mask))
            )
        if options.include_frame and frame is not None:
            info.frame_jpeg = base64.b64encode(imaging.encode_image(frame, "jpeg", 80)).decode("ascii")
        timings.encode = time.perf_counter() - t1
        result = InferResult(
            frame=info,
            activity=activity,
            segmentation=seg_result,
            latency_ms=timings.latency(batch.batch_size),
            model=self.model_ref(),
        )
        return Outcome(result, image)
