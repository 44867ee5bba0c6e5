"""What a stream reader hands to the service: one decoded frame and when it was captured."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CapturedFrame:
    """A decoded frame.

    Attributes:
        image: H x W x 3 uint8, RGB, C-contiguous.
        index: 0-based count of frames decoded from this source (gaps = frames dropped before processing).
        captured_at: `time.time()` when the reader got the frame (frame age is measured from here).
        pts: presentation timestamp in seconds from the stream, when the container provides one.
    """

    image: np.ndarray
    index: int
    captured_at: float
    pts: float | None = None
