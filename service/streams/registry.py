"""The set of live streams: add (allowlist-checked), look up, list as snapshots, remove, close all. Thread-safe."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from service.streams.backends import configure_opencv_ffmpeg
from service.streams.options import ReaderOptions
from service.streams.reader import StreamReader
from service.streams.sources import check_allowlist, redact, validate_source
from service.streams.status import State, StreamListener

logger = logging.getLogger(__name__)


class TooManyStreams(ValueError):
    """`max_streams` streams are already being read."""


class StreamNotFound(KeyError):
    """No stream has this id (it was removed, or never added)."""

    def __str__(self) -> str:  # KeyError quotes its argument; this message is for people
        return str(self.args[0])


@dataclass(frozen=True)
class StreamSnapshot:
    """What the API shows about a stream; the URL is redacted, ages are seconds."""

    id: str
    url: str
    state: State
    fps: float
    frames_read: int
    frames_processed: int
    frames_dropped: int
    reconnects: int
    last_error: str | None
    age_s: float
    last_frame_age_s: float | None


@dataclass
class _Entry:
    reader: StreamReader
    created: float
    processed: int = 0


class StreamRegistry:
    """Owns one `StreamReader` per stream id.

    Args:
        allowlist: URL prefixes streams may use (ENDOSTREAM_STREAM_ALLOWLIST); empty allows nothing.
        listener: passed to every reader (metrics); None for no events.
        max_streams: refuse `add` beyond this many streams (each costs a decoder thread); None for no limit.
        default_options: reader options when `add` gets none.
    """

    def __init__(
        self,
        allowlist: Sequence[str],
        *,
        listener: StreamListener | None = None,
        max_streams: int | None = None,
        default_options: ReaderOptions | None = None,
    ) -> None:
        self._allowlist = check_allowlist(allowlist)
        configure_opencv_ffmpeg()  # now, before any thread opens a capture: see its docstring
        self._listener = listener
        self._max_streams = max_streams
        self._default_options = default_options or ReaderOptions()
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def add(self, url: str, options: ReaderOptions | None = None) -> str:
        """Validate `url`, start a reader for it and return its new id; raises `SourceNotAllowed` or ValueError."""
        target = validate_source(url, self._allowlist)
        with self._lock:
            if self._max_streams is not None and len(self._entries) >= self._max_streams:
                raise TooManyStreams(
                    f"already reading {len(self._entries)} streams (max_streams={self._max_streams}); "
                    "remove one first (DELETE /streams/{id}) or raise ENDOSTREAM_MAX_STREAMS"
                )
            stream_id = uuid.uuid4().hex[:12]
            while stream_id in self._entries:
                stream_id = uuid.uuid4().hex[:12]
            reader = StreamReader(
                target, options or self._default_options, stream_id=stream_id, listener=self._listener
            )
            self._entries[stream_id] = _Entry(reader, time.time())
        reader.start()
        logger.info("stream %s added: %s", stream_id, redact(target))
        return stream_id

    def _entry(self, stream_id: str) -> _Entry:
        entry = self._entries.get(stream_id)
        if entry is None:
            raise StreamNotFound(f"no stream with id {stream_id!r}; list the current ones with StreamRegistry.list()")
        return entry

    def get(self, stream_id: str) -> StreamReader:
        """The reader of `stream_id` (its `.get()` returns the newest frame); raises `StreamNotFound`."""
        with self._lock:
            return self._entry(stream_id).reader

    def mark_processed(self, stream_id: str, count: int = 1) -> None:
        """Count frames of this stream the service ran through the model; unknown ids are ignored (just removed)."""
        with self._lock:
            entry = self._entries.get(stream_id)
            if entry is not None:
                entry.processed += count

    def snapshot(self, stream_id: str) -> StreamSnapshot:
        with self._lock:
            entry = self._entry(stream_id)
            return self._snapshot(stream_id, entry, time.time())

    def list(self) -> list[StreamSnapshot]:
        """Snapshots of every stream, oldest first."""
        now = time.time()
        with self._lock:
            items = sorted(self._entries.items(), key=lambda kv: kv[1].created)
            return [self._snapshot(sid, entry, now) for sid, entry in items]

    @staticmethod
    def _snapshot(stream_id: str, entry: _Entry, now: float) -> StreamSnapshot:
        stats = entry.reader.stats()
        return StreamSnapshot(
            id=stream_id,
            url=redact(entry.reader.url),
            state=stats.state,
            fps=round(stats.fps, 2),
            frames_read=stats.frames_read,
            frames_processed=entry.processed,
            frames_dropped=stats.frames_dropped,
            reconnects=stats.reconnects,
            last_error=stats.last_error,
            age_s=round(now - entry.created, 3),
            last_frame_age_s=None if stats.last_frame_at is None else round(now - stats.last_frame_at, 3),
        )

    def remove(self, stream_id: str, timeout: float = 1.0) -> None:
        """Stop the stream's reader (waits up to `timeout` s) and forget it; raises `StreamNotFound`."""
        with self._lock:
            entry = self._entry(stream_id)
            del self._entries[stream_id]
        if not entry.reader.stop(timeout):
            logger.warning("stream %s: reader still in a blocking open/read; it exits when that times out", stream_id)
        logger.info("stream %s removed", stream_id)

    def close_all(self, timeout: float = 1.0) -> None:
        """Stop every reader: all are signalled first, so the total wait is about `timeout`, not one per stream."""
        with self._lock:
            entries = list(self._entries.items())
            self._entries.clear()
        for _, entry in entries:
            entry.reader.stop(timeout=0)
        deadline = time.monotonic() + timeout
        for stream_id, entry in entries:
            if not entry.reader.stop(max(0.0, deadline - time.monotonic())):
                logger.warning("stream %s: reader still in a blocking open/read at shutdown", stream_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, stream_id: object) -> bool:
        with self._lock:
            return stream_id in self._entries
