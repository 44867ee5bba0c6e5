"""Dynamic batching in front of one engine, run by the single worker thread that owns it.

Requests hand over preprocessed frames; the worker takes the oldest, then gathers more until `max_batch` frames or
`max_queue_delay` after the first one arrived. It waits only while other frames are known to be on their way
(`announce()`d by requests still decoding), so a lone stream is never delayed to fill a batch and runs at
batch 1. The queue is bounded: when it is full `submit` fails at once (the route answers 503 + Retry-After) instead
of letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.decoding import stack_frames
from service.engines.base import Engine
from service.errors import NotReady, Overloaded
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """One frame's outputs (batch dimension removed) and where its time went."""

    outputs: dict[str, np.ndarray]
    queue_s: float  # submitted -> its batch started
    infer_s: float  # the engine call for its batch
    batch_size: int


@dataclass
class _Pending:
    frame: Any  # numpy array or device tensor
    future: Future[BatchResult]
    enqueued: float


class Batcher:
    """Owns the engine: opens it, warms it up and runs every batch in one thread."""

    def __init__(
        self,
        open_engine: Callable[[], Engine],
        *,
        max_batch: int,
        max_queue_delay_s: float,
        queue_limit: int,
        metrics: ServiceMetrics,
        max_queue_wait_s: float | None = None,
        warm_up: Callable[[Engine], None] | None = None,
    ) -> None:
        self._open_engine = open_engine
        self._warm_up = warm_up
        self.max_batch = max_batch
        self.max_queue_delay_s = max_queue_delay_s
        self.queue_limit = queue_limit
        self.max_queue_wait_s = max_queue_wait_s
        self._metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._incoming = 0
        self._running = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.engine: Engine | None = None
        self.startup_error: BaseException | None = None
        self.startup_seconds = 0.0

    # -------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._main, name="engine-worker", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the engine is warm (True) or failed/timed out (False)."""
        self._ready.wait(timeout)
        return self.ready

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.engine is not None and self.startup_error is None

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in flight, fail what is still queued, close the engine."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ----------------------------------------------------------------------------------------------- client
    def announce(self) -> None:
        """A frame is about to be decoded: a forming batch may wait (up to the delay) for it. Pair with `arrived`.

        Admission happens here, before the frame costs a decode: when the frames already decoding or queued reach
        `queue_limit`, or the oldest queued frame has waited over `max_queue_wait_s`, raises Overloaded at once
        (503 + Retry-After) instead of decoding a frame that would wait.
        """
        with self._cond:
            if self._incoming + len(self._queue) >= self.queue_limit:
                self._metrics.rejected.labels("queue_full").inc()
                raise Overloaded(
                    f"{self._incoming + len(self._queue)} frames are already decoding or waiting for the engine "
                    f"(ENDOSTREAM_QUEUE_LIMIT={self.queue_limit}); retry shortly or add capacity"
                )
            waited = time.perf_counter() - self._queue[0].enqueued if self._queue else 0.0
            if self.max_queue_wait_s is not None and waited > self.max_queue_wait_s:
                # the engine is behind: a new frame would wait at least this long too, so it is refused while it
                # is cheap, and the frames already accepted keep their latency
                self._metrics.rejected.labels("queue_full").inc()
                raise Overloaded(
                    f"the oldest frame has waited {waited * 1000:.0f} ms for the engine (ENDOSTREAM_MAX_QUEUE_WAIT_MS="
                    f"{self.max_queue_wait_s * 1000:g}); retry shortly or add capacity"
                )
            self._incoming += 1

    def arrived(self) -> None:
        """The announced frame was submitted (or failed): batches stop waiting for it. Any thread may call this."""
        with self._cond:
            self._incoming -= 1
            self._cond.notify_all()

    @contextmanager
    def expect(self) -> Iterator[None]:
        """`announce` on entry, `arrived` on exit."""
        self.announce()
        try:
            yield
        finally:
            self.arrived()

    def submit(self, frame: Any) -> Future[BatchResult]:
        """Queue one H x W x 3 uint8 frame at the model size (numpy, or a tensor on the engine's device); thread-safe.

        Raises:
            NotReady: the engine is not warm yet.
            Overloaded: the queue is full.
        """
        if not self.ready:
            raise NotReady()
        future: Future[BatchResult] = Future()
        with self._cond:
            if len(self._queue) >= self.queue_limit:
                self._metrics.rejected.labels("queue_full").inc()
                raise Overloaded(
                    f"{len(self._queue)} frames are already waiting for the engine (ENDOSTREAM_QUEUE_LIMIT="
                    f"{self.queue_limit}); retry shortly or add capacity"
                )
            self._queue.append(_Pending(frame, future, time.perf_counter()))
            self._metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()
        return future

    async def infer(self, frame: Any) -> BatchResult:
        return await asyncio.wrap_future(self.submit(frame))

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # ----------------------------------------------------------------------------------------------- worker
    def _main(self) -> None:
        started = time.perf_counter()
        try:
            engine = self._open_engine()
            if self._warm_up is not None:
                self._warm_up(engine)
        except BaseException as err:  # reported by /readyz and the startup log; the worker ends
            # One ERROR line comes from the lifecycle watcher, which knows whether the process exits; the traceback
            # is for whoever debugs the backend (ENDOSTREAM_LOG_LEVEL=debug).
            logger.debug("engine failed to start", exc_info=True)
            self.startup_error = err
            self._ready.set()
            return
        self.engine = engine
        self.startup_seconds = time.perf_counter() - started
        self._ready.set()
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                self._run(engine, batch)
        finally:
            self._fail_queued()
            engine.close()

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            batch: list[_Pending] = []
            while not batch:
                while not self._queue or not self._running:
                    if not self._running:
                        return None  # shutting down: what is still queued is failed by _fail_queued
                    self._cond.wait()
                batch = self._take(1)
            deadline = batch[0].enqueued + self.max_queue_delay_s
            while len(batch) < self.max_batch:
                if self._queue:
                    batch += self._take(self.max_batch - len(batch))
                    continue
                remaining = deadline - time.perf_counter()
                if self._incoming == 0 or remaining <= 0 or not self._running:
                    break
                self._cond.wait(remaining)
            self._metrics.queue_depth.set(len(self._queue))
        return batch

    def _take(self, limit: int) -> list[_Pending]:
        """Up to `limit` queued frames whose callers still wait (a caller that went away cancelled its future)."""
        taken = []
        while self._queue and len(taken) < limit:
            pending = self._queue.popleft()
            if pending.future.set_running_or_notify_cancel():  # False: cancelled; from now on it cannot be
                taken.append(pending)
        return taken

    def _run(self, engine: Engine, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            outputs = engine.run(stack_frames([p.frame for p in batch]))
        except BaseException as err:
            logger.exception("engine call failed for a batch of %d", len(batch))
            for pending in batch:
                pending.future.set_exception(err)
            return
        infer_s = time.perf_counter() - started
        self._metrics.batch_size.observe(len(batch))
        for i, pending in enumerate(batch):
            result = BatchResult({k: v[i] for k, v in outputs.items()}, started - pending.enqueued, infer_s, len(batch))
            pending.future.set_result(result)

    def _fail_queued(self) -> None:
        with self._cond:
            for pending in self._take(len(self._queue)):
                pending.future.set_exception(NotReady("the service is shutting down"))
