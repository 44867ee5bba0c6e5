"""Single-slot latest-frame-wins buffer between a stream reader thread and its consumer.

Live video must never queue: a consumer slower than the camera would see ever older frames. The reader overwrites
the slot; a frame overwritten before anyone took it is counted as dropped (SERVING_NOTES "Live video").
"""

from __future__ import annotations

import threading
import time

from service.streams.frames import CapturedFrame


class LatestFrame:
    """Holds the newest frame; `put` overwrites, `get` blocks until a frame newer than the last one taken."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: CapturedFrame | None = None
        self._taken = -1  # highest index handed out by get()
        self._dropped = 0
        self._closed = False

    @property
    def dropped(self) -> int:
        """Frames overwritten before any consumer took them."""
        with self._cond:
            return self._dropped

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def put(self, frame: CapturedFrame) -> bool:
        """Store `frame`; returns True when it overwrote a frame nobody had taken (one more drop)."""
        with self._cond:
            dropped = self._frame is not None and self._frame.index > self._taken
            if dropped:
                self._dropped += 1
            self._frame = frame
            self._cond.notify_all()
            return dropped

    def peek(self) -> CapturedFrame | None:
        """The newest frame, without marking it taken (for previews and health checks)."""
        with self._cond:
            return self._frame

    def get(self, timeout: float | None = None, after_index: int | None = None) -> CapturedFrame | None:
        """Wait for a frame newer than the last one taken (or than `after_index`) and take it.

        Args:
            timeout: seconds to wait; None waits until a frame arrives or the buffer is closed.
            after_index: return only a frame with a larger index; default: the last index any `get` returned.
                A second consumer passes its own cursor here so the two do not steal frames from each other.

        Returns:
            The newest frame, or None on timeout or once the buffer is closed (the reader stopped).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                after = self._taken if after_index is None else after_index
                frame = self._frame
                if frame is not None and frame.index > after:
                    self._taken = max(self._taken, frame.index)
                    return frame
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def close(self) -> None:
        """Wake every waiting consumer; later `get` calls return None once no newer frame is left."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
