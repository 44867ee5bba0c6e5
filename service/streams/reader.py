"""One reader thread per stream: open, decode, publish the newest frame, reconnect with backoff.

Decoding runs in a daemon thread, never on the event loop; frames go to a single-slot `LatestFrame`. A lost network
stream is reopened after a jittered exponential backoff (`options.backoff_delay`); the failure count behind it resets
with the first frame after a reopen. A file source ends at EOF (or restarts with `loop`).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Literal
from urllib.parse import unquote, urlsplit

import numpy as np

from service.streams.backends import FrameSource, SourceError, open_source
from service.streams.buffer import LatestFrame
from service.streams.frames import CapturedFrame
from service.streams.options import ReaderOptions, backoff_delay
from service.streams.sources import redact
from service.streams.status import FINAL_STATES, NullListener, State, StreamListener, StreamStats

__all__ = ["FINAL_STATES", "ReaderOptions", "State", "StreamListener", "StreamReader", "StreamStats"]

logger = logging.getLogger(__name__)

_FPS_ALPHA = 0.1  # EMA weight of the newest frame interval: ~10-frame memory, steady yet quick after a reconnect


def _local_path(url: str) -> str | None:
    """The file path of a file: URL (or of a bare path), None for network URLs."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return unquote(parts.path)
    return url if not parts.scheme else None


class StreamReader:
    """Reads one stream in a daemon thread into a `LatestFrame`; see the module docstring for the recovery policy.

    `stop()` returns within its `timeout` (1 s by default) even mid-open: the thread checks a stop event between
    every blocking call, but an OpenCV/FFmpeg open or read cannot be interrupted, so the thread itself may run on
    for up to `open_timeout` (or `read_timeout`) before it closes the source and exits, publishing nothing more.
    """

    def __init__(
        self,
        url: str,
        options: ReaderOptions | None = None,
        *,
        stream_id: str = "stream",
        listener: StreamListener | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.url, self.stream_id = url, stream_id
        self.options = options or ReaderOptions()
        self.frames = LatestFrame()
        self._label = redact(url)
        self._path = _local_path(url)
        self._listener: StreamListener = listener or NullListener()
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # Held across a state change and its listener call, so listeners see states in the order they happened
        # (stop() in another thread vs. the reader's own changes). Re-entrant: a listener may call stop().
        self._state_events = threading.RLock()
        self._state: State = "connecting"
        self._frames_read = self._reconnects = self._failures = 0
        self._fps_dt: float | None = None
        self._last_error: str | None = None
        self._opened_at: float | None = None
        self._last_frame_at: float | None = None
        self._backoff = 0.0
        self._thread = threading.Thread(target=self._run, name=f"stream-{stream_id}", daemon=True)

    # -- public API ------------------------------------------------------------------------------------------------

    def start(self) -> StreamReader:
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> bool:
        """Stop reading and wake consumers; returns True when the thread has exited within `timeout` seconds."""
        self._stop.set()
        self.frames.close()
        with self._state_events:
            with self._lock:
                changed = self._state not in FINAL_STATES
                if changed:
                    self._state = "stopped"
            if changed:
                self._notify("on_state", "stopped")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def get(self, timeout: float | None = None, after_index: int | None = None) -> CapturedFrame | None:
        """Shortcut for `self.frames.get`: the next newer frame, None on timeout or once stopped."""
        return self.frames.get(timeout, after_index)

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> StreamStats:
        with self._lock:
            fps = 1.0 / self._fps_dt if self._state == "streaming" and self._fps_dt else 0.0
            return StreamStats(
                self._state, fps, self._frames_read, self.frames.dropped, self._reconnects, self._last_error,
                self._opened_at, self._last_frame_at, self._failures, self._backoff,
            )  # fmt: skip

    def __enter__(self) -> StreamReader:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reader thread ---------------------------------------------------------------------------------------------

    def _notify(self, event: str, *args: object) -> None:
        try:
            getattr(self._listener, event)(self.stream_id, *args)
        except Exception:  # a broken metrics hook must not kill the stream
            logger.exception("stream %s: listener %s failed", self.stream_id, event)

    def _set_state(self, state: State) -> None:
        with self._state_events:
            with self._lock:
                if self._state == state or self._stop.is_set():
                    return  # after stop() only "stopped" is reported
                self._state = state
            logger.info("stream %s (%s): %s", self.stream_id, self._label, state)
            self._notify("on_state", state)

    def _error(self, message: str) -> None:
        with self._lock:
            self._last_error = message
        logger.warning("stream %s: %s", self.stream_id, message)

    def _run(self) -> None:
        opt, attempted = self.options, False
        self._notify("on_state", "connecting")
        try:
            while not self._stop.is_set():
                if attempted:
                    with self._lock:
                        self._reconnects += 1
                    self._notify("on_reconnect")
                attempted = True
                if self._path is not None and not os.path.isfile(self._path):
                    self._error(f"file {self._path!r} not found; check the stream URL")
                    self._set_state("failed")
                    return
                outcome = self._session()
                while outcome == "eof" and opt.loop and self._path is not None and not self._stop.is_set():
                    outcome = self._session()  # a looping file restarts at once: not a reconnect
                if outcome in ("stopped", "failed"):
                    return
                if outcome == "eof" and self._path is not None:
                    self._set_state("ended")
                    return
                self._set_state("reconnecting")
                with self._lock:
                    self._failures += 1
                    failures = self._failures
                if opt.max_reconnects is not None and failures > opt.max_reconnects:
                    self._error(f"gave up after {failures} failed attempts in a row (max_reconnects)")
                    self._set_state("failed")
                    return
                delay = backoff_delay(failures, opt.backoff_initial, opt.backoff_max, opt.backoff_factor, self._rng)
                with self._lock:
                    self._backoff = delay
                self._stop.wait(delay)
        except Exception as err:  # a bug here must show as a failed stream, not a silently dead thread
            logger.exception("stream %s: reader crashed", self.stream_id)
            self._error(f"reader crashed: {err!r}")
            self._set_state("failed")
        finally:
            self.frames.close()

    def _session(self) -> Literal["eof", "lost", "stopped", "failed"]:
        """Open once and pump frames until EOF, loss or stop."""
        opt = self.options
        try:
            source = open_source(
                self._path if self._path is not None else self.url,
                label=self._label,
                backend=opt.backend,
                open_timeout=opt.open_timeout,
                read_timeout=opt.read_timeout,
                network=self._path is None,
            )
        except SourceError as err:
            self._error(str(err))
            return "lost"
        try:
            if self._stop.is_set():
                return "stopped"
            with self._lock:
                self._opened_at, self._fps_dt = time.time(), None
            return self._pump(source)
        finally:
            source.close()

    def _pump(self, source: FrameSource) -> Literal["eof", "lost", "stopped", "failed"]:
        opt = self.options
        stall = min(opt.read_timeout, opt.watchdog_periods / source.fps) if source.fps else opt.read_timeout
        pace = opt.realtime and self._path is not None
        anchor: float | None = None  # monotonic time at which pts 0 is due
        count, previous = 0, None
        while not self._stop.is_set():
            try:
                item = source.read(time.monotonic() + stall)
            except SourceError as err:
                self._error(str(err))
                return "lost"
            if item is None:
                if count == 0:
                    self._error(f"{self._label} opened but delivered no frame (read timeout {opt.read_timeout:g} s)")
                    if self._path is not None:
                        self._set_state("failed")
                        return "failed"
                elif self._path is None:
                    self._error(f"{self._label}: stream lost after {count} frames (EOF, timeout or disconnect)")
                return "eof" if self._path is not None else "lost"
            image, pts = item
            if pace:
                at = pts if pts is not None else count / (source.fps or 30.0)
                now = time.monotonic()
                if anchor is None or now - (anchor + at) > 1.0:
                    anchor = now - at  # first frame, or we fell a second behind: re-anchor rather than burst
                if self._stop.wait(max(0.0, anchor + at - now)):
                    break
            if self._stop.is_set():
                break
            previous = self._publish(image, pts, previous)
            count += 1
        return "stopped"

    def _publish(self, image: np.ndarray, pts: float | None, previous: float | None) -> float:
        now, wall = time.monotonic(), time.time()
        with self._lock:
            index = self._frames_read
            self._frames_read += 1
            self._failures = 0  # a frame arrived: the next loss starts the backoff from `backoff_initial`
            self._last_frame_at = wall
            if previous is not None:
                dt = max(now - previous, 1e-6)
                self._fps_dt = dt if self._fps_dt is None else self._fps_dt + _FPS_ALPHA * (dt - self._fps_dt)
        frame = CapturedFrame(np.ascontiguousarray(image), index, wall, pts)
        if self.frames.put(frame):
            self._notify("on_drop", "stale")  # the metrics' reason: replaced by a newer frame
        self._set_state("streaming")
        self._notify("on_frame")
        return now
