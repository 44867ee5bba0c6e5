"""Reader states, the stats snapshot and the listener protocol the metrics module implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

State = Literal["connecting", "streaming", "reconnecting", "ended", "stopped", "failed"]
FINAL_STATES: frozenset[str] = frozenset({"ended", "stopped", "failed"})


@dataclass(frozen=True)
class StreamStats:
    """A consistent snapshot of a reader (`time.time()` stamps; fps is 0.0 unless streaming)."""

    state: State
    fps: float
    frames_read: int
    frames_dropped: int
    reconnects: int
    last_error: str | None
    opened_at: float | None
    last_frame_at: float | None
    consecutive_failures: int
    backoff_s: float


class StreamListener(Protocol):
    """Observer of reader events (the metrics module implements it). Called from the reader thread: be quick."""

    def on_frame(self, stream_id: str) -> None: ...
    def on_drop(self, stream_id: str, reason: str) -> None: ...
    def on_reconnect(self, stream_id: str) -> None: ...
    def on_state(self, stream_id: str, state: State) -> None: ...


class NullListener:
    """The default listener: ignores every event."""

    def on_frame(self, stream_id: str) -> None:
        pass

    def on_drop(self, stream_id: str, reason: str) -> None:
        pass

    def on_reconnect(self, stream_id: str) -> None:
        pass

    def on_state(self, stream_id: str, state: State) -> None:
        pass
