"""How a stream reader opens, paces and recovers a source, and the reconnect delay it waits between attempts.

Reconnects use exponential backoff with full jitter: delay ~ U(0, min(max, initial * factor**(n-1))) after n
consecutive failures (AWS Architecture Blog, "Exponential Backoff And Jitter"), so many cameras behind one failed
switch do not reconnect in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from service.streams.backends import Backend


@dataclass(frozen=True)
class ReaderOptions:
    """How a reader opens, paces and recovers a stream (times in seconds).

    Attributes:
        backend: "pyav" (per-open options, container PTS, opens in parallel) or "opencv" (cv2 on FFmpeg; OpenCV
            holds one process-wide lock across every FFmpeg open, so a dead camera's open delays all others).
        open_timeout: bound on one open (connect, RTSP handshake, stream probing).
        read_timeout: bound on one blocked read; also the watchdog limit when the source reports no frame rate.
        watchdog_periods: reopen when no frame decodes for this many nominal frame periods, at most read_timeout
            (PyAV checks between packets; an OpenCV read is bounded by read_timeout alone).
        realtime: file sources play at their native rate (by PTS); False decodes as fast as possible.
        loop: file sources restart at EOF instead of ending.
        backoff_initial, backoff_max, backoff_factor: delay ceiling initial * factor**(n-1) after n failures, capped.
            The 1 s cap is for cameras next to the service: a restarted camera must be back within ~2 s (median)
            and a refused attempt costs next to nothing; raise it for sources behind slow or metered links.
        max_reconnects: consecutive failed attempts before the state becomes "failed"; None retries forever.
    """

    backend: Backend = "pyav"
    open_timeout: float = 5.0
    read_timeout: float = 5.0
    watchdog_periods: float = 30.0
    realtime: bool = True
    loop: bool = False
    backoff_initial: float = 0.5
    backoff_max: float = 1.0
    backoff_factor: float = 2.0
    max_reconnects: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("opencv", "pyav"):
            raise ValueError(f"backend must be 'opencv' or 'pyav'; got {self.backend!r}")
        for name in ("open_timeout", "read_timeout", "watchdog_periods", "backoff_initial", "backoff_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds; got {getattr(self, name)!r}")
        if self.backoff_initial > self.backoff_max:
            raise ValueError(
                f"backoff_initial ({self.backoff_initial!r}) must not exceed backoff_max ({self.backoff_max!r})"
            )
        if self.backoff_factor < 1:
            raise ValueError(f"backoff_factor must be >= 1; got {self.backoff_factor!r}")
        if self.max_reconnects is not None and self.max_reconnects < 0:
            raise ValueError(f"max_reconnects must be >= 0 or None; got {self.max_reconnects!r}")


def backoff_delay(failures: int, initial: float, maximum: float, factor: float, rng: random.Random) -> float:
    """Full-jitter delay after `failures` consecutive failures (>= 1): U(0, min(maximum, initial*factor**(n-1)))."""
    ceiling = min(maximum, initial * factor ** max(0, failures - 1))
    return rng.uniform(0.0, ceiling)
