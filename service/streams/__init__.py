"""Stream ingestion: reader threads with latest-frame buffers, a registry of live streams, source allowlisting."""

from service.streams.buffer import LatestFrame
from service.streams.frames import CapturedFrame
from service.streams.options import ReaderOptions, backoff_delay
from service.streams.reader import StreamReader
from service.streams.registry import StreamNotFound, StreamRegistry, StreamSnapshot, TooManyStreams
from service.streams.sources import SourceNotAllowed, is_allowed, normalize, redact, validate_source
from service.streams.status import FINAL_STATES, NullListener, State, StreamListener, StreamStats

__all__ = [
    "FINAL_STATES",
    "CapturedFrame",
    "LatestFrame",
    "NullListener",
    "ReaderOptions",
    "SourceNotAllowed",
    "State",
    "StreamListener",
    "StreamNotFound",
    "StreamReader",
    "StreamRegistry",
    "StreamSnapshot",
    "StreamStats",
    "TooManyStreams",
    "backoff_delay",
    "is_allowed",
    "normalize",
    "redact",
    "validate_source",
]
