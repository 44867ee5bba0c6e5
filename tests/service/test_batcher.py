"""The dynamic batcher with a stand-in engine: batches form only while frames are on their way, a lone caller runs
at batch 1, the queue is bounded, engine errors reach the callers, and shutdown fails what is still queued."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import Batcher
from service.errors import NotReady, Overloaded
from service.metrics import ServiceMetrics


class SlowEngine:
    """Echoes each frame's first pixel as its output after `delay` seconds per call; records batch sizes."""

    backend, device, precision, output_names = "fake", "cpu", "fp32", ("echo",)

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.delay, self.fail = delay, fail
        self.batches: list[int] = []
        self.closed = False

    def run(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        self.batches.append(len(frames))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("device lost")
        return {"echo": frames[:, 0, 0, 0].copy()}

    def close(self) -> None:
        self.closed = True


def _batcher(engine: SlowEngine, **kw) -> Batcher:
    options = {"max_batch": 8, "max_queue_delay_s": 0.05, "queue_limit": 64, **kw}
    batcher = Batcher(lambda: engine, metrics=ServiceMetrics(), **options)
    batcher.start()
    assert batcher.wait_ready(5)
    return batcher


def _frame(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


def test_lone_caller_runs_at_batch_one_without_waiting() -> None:
    engine = SlowEngine()
    batcher = _batcher(engine, max_queue_delay_s=0.5)
    try:
        for i in range(5):
            started = time.perf_counter()
            with batcher.expect():
                future = batcher.submit(_frame(i))
            result = future.result(5)
            assert time.perf_counter() - started < 0.2  # never waits the 0.5 s delay for company
            assert result.outputs["echo"] == i and result.batch_size == 1
        assert engine.batches == [1] * 5
    finally:
        batcher.stop()


def test_concurrent_callers_share_batches_and_get_their_own_outputs() -> None:
    engine = SlowEngine(delay=0.02)
    batcher = _batcher(engine)
    barrier = threading.Barrier(8)

    def call(i: int) -> tuple[int, int]:
        with batcher.expect():
            barrier.wait()  # all eight are "decoding" before anyone submits
            time.sleep(0.001 * i)
            future = batcher.submit(_frame(i))
        result = future.result(5)
        return int(result.outputs["echo"]), result.batch_size

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(8)))
        assert [r[0] for r in results] == list(range(8))  # each caller got its own frame's output
        assert max(r[1] for r in results) > 1 and sum(engine.batches) == 8
        assert len(engine.batches) < 8
    finally:
        batcher.stop()


def test_queue_limit_refuses_at_once() -> None:
    engine = SlowEngine(delay=0.3)
    batcher = _batcher(engine, max_batch=1, queue_limit=2)
    try:
        first = batcher.submit(_frame(0))
        time.sleep(0.05)  # the worker has taken it; two more fill the queue
        queued = [batcher.submit(_frame(i)) for i in (1, 2)]
        started = time.perf_counter()
        with pytest.raises(Overloaded) as refused:
            batcher.submit(_frame(3))
        assert time.perf_counter() - started < 0.05 and refused.value.retry_after == 1
        assert "ENDOSTREAM_QUEUE_LIMIT=2" in refused.value.message
        assert [f.result(5).outputs["echo"] for f in (first, *queued)] == [0, 1, 2]
    finally:
        batcher.stop()


def test_admission_counts_frames_still_decoding_before_they_cost_a_decode() -> None:
    engine = SlowEngine(delay=0.3)
    batcher = _batcher(engine, max_batch=1, queue_limit=3)
    try:
        running = batcher.submit(_frame(0))
        time.sleep(0.05)  # the worker has taken it
        queued = batcher.submit(_frame(1))
        batcher.announce()  # two frames decoding, one queued: the limit is reached
        batcher.announce()
        with pytest.raises(Overloaded) as refused:
            batcher.announce()
        assert "already decoding or waiting" in refused.value.message
        batcher.arrived()  # one decode finished without a frame (bad input): room for another
        batcher.announce()
        batcher.arrived()
        batcher.arrived()
        assert [f.result(5).outputs["echo"] for f in (running, queued)] == [0, 1]
    finally:
        batcher.stop()


def test_a_queue_that_has_waited_too_long_refuses_new_frames() -> None:
    engine = SlowEngine(delay=0.3)
    batcher = _batcher(engine, max_batch=1, max_queue_wait_s=0.05)
    try:
        running = batcher.submit(_frame(0))
        time.sleep(0.05)  # the worker is busy with it for 0.3 s
        queued = batcher.submit(_frame(1))
        batcher.announce()  # the queue is fresh: admitted
        batcher.arrived()
        time.sleep(0.1)
        with pytest.raises(Overloaded) as refused:
            batcher.announce()
        assert "ENDOSTREAM_MAX_QUEUE_WAIT_MS=50" in refused.value.message
        assert [f.result(5).outputs["echo"] for f in (running, queued)] == [0, 1]
        batcher.announce()  # drained: admitted again
        batcher.arrived()
    finally:
        batcher.stop()


def test_engine_error_reaches_every_caller_in_the_batch_and_the_worker_survives() -> None:
    engine = SlowEngine(fail=True)
    batcher = _batcher(engine)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            batcher.submit(_frame(1)).result(5)
        engine.fail = False
        assert batcher.submit(_frame(2)).result(5).outputs["echo"] == 2
    finally:
        batcher.stop()


def test_not_ready_before_start_and_failed_start_reported() -> None:
    batcher = Batcher(lambda: SlowEngine(), max_batch=1, max_queue_delay_s=0, queue_limit=1, metrics=ServiceMetrics())
    with pytest.raises(NotReady):
        batcher.submit(_frame(0))

    def broken() -> SlowEngine:
        raise FileNotFoundError("model.plan missing")

    failing = Batcher(broken, max_batch=1, max_queue_delay_s=0, queue_limit=1, metrics=ServiceMetrics())
    failing.start()
    assert failing.wait_ready(5) is False
    assert isinstance(failing.startup_error, FileNotFoundError)


def test_stop_closes_the_engine_and_fails_queued_frames() -> None:
    engine = SlowEngine(delay=0.2)
    batcher = _batcher(engine, max_batch=1)
    running = batcher.submit(_frame(0))
    time.sleep(0.05)
    waiting = batcher.submit(_frame(1))
    batcher.stop()
    assert running.result(5).outputs["echo"] == 0
    with pytest.raises(NotReady):
        waiting.result(5)
    assert engine.closed


def test_a_caller_that_gave_up_is_skipped_and_the_worker_survives() -> None:
    engine = SlowEngine(delay=0.2)
    batcher = _batcher(engine, max_batch=4)
    try:
        busy = batcher.submit(_frame(0))
        time.sleep(0.05)
        abandoned = batcher.submit(_frame(1))
        assert abandoned.cancel()  # e.g. the HTTP client disconnected while its frame was queued
        kept = batcher.submit(_frame(2))
        assert busy.result(5).outputs["echo"] == 0
        assert kept.result(5).outputs["echo"] == 2
        assert engine.batches == [1, 1]  # the abandoned frame never reached the engine
    finally:
        batcher.stop()
