"""How many frame requests the service lets in at once: a limit that follows the latency it causes.

A fixed concurrency limit is wrong on both sides: on two CPU cores every admitted request beyond about two only waits
(Little's law: 16 in flight at ~60 frames/s is ~270 ms each), while a GPU needs many in flight to fill its batches.
So the limit adapts, in the manner of TCP Vegas and Netflix's concurrency-limits: the no-load latency is the smallest
server time seen over the last `window` requests (the limit itself keeps some requests unqueued, so that minimum
stays honest under overload). While the recent latency (an average over about the last ten requests, so that two
frames that happen to collide do not count as overload) is above `tolerance` x the no-load latency, each request
shrinks the limit by `backoff`; while it is within, a request that finished while the limit was in use grows the
limit by 1/limit (about one per limit's worth of requests). The configured maximum stays the ceiling; the floor is
one request.

"Server time" runs from the request's last body byte to its last response byte, so a slow uploader never looks like
a slow server.
"""

from __future__ import annotations

from collections import deque

_LATENCY_ALPHA = 0.1  # EWMA weight of the newest request: about ten requests of memory


class AdaptiveLimit:
    """The current admission limit, fed with each admitted request's server time."""

    def __init__(
        self, ceiling: int, *, tolerance: float = 1.5, backoff: float = 0.9, window: int = 500, initial: int = 4
    ) -> None:
        """
        Args:
            ceiling: the most requests ever admitted at once (ENDOSTREAM_MAX_CONCURRENT_REQUESTS).
            tolerance: a request slower than this x the no-load latency shrinks the limit; 0 keeps it at `ceiling`.
            backoff: the factor one slow request applies to the limit.
            window: how many recent requests the no-load latency is the minimum of.
            initial: the limit before any request finished (at most `ceiling`).
        """
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1; got {ceiling}")
        if tolerance != 0 and tolerance <= 1:
            raise ValueError(f"tolerance must be > 1 (or 0 for a fixed limit); got {tolerance}")
        if not 0 < backoff < 1:
            raise ValueError(f"backoff must be in (0, 1); got {backoff}")
        self.ceiling, self.tolerance, self.backoff = ceiling, tolerance, backoff
        self._limit = float(ceiling if tolerance == 0 else min(initial, ceiling))
        self._recent: deque[float] = deque(maxlen=window)
        self._latency: float | None = None  # EWMA of the server time

    @property
    def adaptive(self) -> bool:
        return self.tolerance != 0

    @property
    def limit(self) -> int:
        """Requests that may be in progress at once now (1 .. ceiling)."""
        return max(1, min(self.ceiling, int(self._limit)))

    @property
    def no_load_s(self) -> float | None:
        """The smallest server time over the window (None before the first request)."""
        return min(self._recent) if self._recent else None

    def shed(self) -> None:
        """An admitted request was refused further in (the engine queue is full): shrink as for a slow one."""
        if self.adaptive:
            self._limit = max(1.0, self._limit * self.backoff)

    def observe(self, seconds: float, in_flight: int) -> None:
        """One admitted request finished after `seconds` of server time, with `in_flight` requests in progress
        (itself included) when it was admitted."""
        if not self.adaptive:
            return
        self._recent.append(seconds)
        no_load = min(self._recent)
        latency = seconds if self._latency is None else self._latency + _LATENCY_ALPHA * (seconds - self._latency)
        self._latency = latency
        if latency > self.tolerance * no_load:
            self.shed()
        elif in_flight >= self.limit:  # only a limit that was reached has shown it can grow
            self._limit = min(float(self.ceiling), self._limit + 1.0 / self._limit)
