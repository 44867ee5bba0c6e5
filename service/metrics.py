"""Prometheus metrics (prefix `endostream_`, base units, `_total` counters, low-cardinality labels only).

Latency buckets are dense from 1 to 20 ms and hit one, two and four frame periods of 60/30/15 fps exactly (0.0167,
0.0333, 0.0667 s), so "share of frames within one frame period" is a ratio of two bucket counters, not an estimate.
Each app builds its own `CollectorRegistry`, so several apps (tests, benchmarks) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("decode", "preprocess", "queue", "infer", "postprocess", "encode")
SOURCES = ("http", "websocket", "stream")
FRAME_PERIOD_BUCKETS = (0.0167, 0.0333, 0.0667)
LATENCY_BUCKETS = tuple(
    sorted(
        {0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.010, 0.012, 0.014, 0.016, 0.018, 0.020}
        | set(FRAME_PERIOD_BUCKETS)
        | {0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0}
    )
)
AGE_BUCKETS = tuple(sorted(set(LATENCY_BUCKETS) | {0.0833, 0.2, 0.3}))
REJECT_REASONS = (
    "queue_full", "too_large", "body_timeout", "bodies_in_flight", "bad_input", "unauthorized", "forbidden_source",
    "too_many_streams",
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


class ServiceMetrics:
    """All metrics of one service instance, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "endostream_http_request_duration_seconds",
            "HTTP request duration by route template and status class (RED: rate, errors, duration).",
            ["route", "method", "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("endostream_http_requests_in_flight", "HTTP requests being served.", registry=r)
        self.stage_duration = Histogram(
            "endostream_stage_duration_seconds",
            "Time per frame in each pipeline stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.frame_latency = Histogram(
            "endostream_frame_latency_seconds",
            "Service time per frame, from the bytes (or decoded stream frame) to the encoded result, by source.",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "endostream_batch_size", "Frames per engine call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("endostream_queue_depth", "Frames waiting for the engine.", registry=r)
        self.admission_limit = Gauge(
            "endostream_admission_limit",
            "Frame requests admitted at once now (adapts to latency; ENDOSTREAM_MAX_CONCURRENT_REQUESTS caps it).",
            registry=r,
        )
        self.rejected = Counter(
            "endostream_rejected_total",
            f"Requests or frames refused, by reason ({', '.join(REJECT_REASONS)}).",
            ["reason"],
            registry=r,
        )
        self.frames = Counter(
            "endostream_frames_total",
            "Frames by outcome (processed, dropped, failed) and source (http, websocket, stream).",
            ["outcome", "source"],
            registry=r,
        )
        self.dropped = Counter(
            "endostream_dropped_frames_total",
            "Frames skipped to stay live, by reason (stale: a newer frame replaced it before processing).",
            ["reason", "source"],
            registry=r,
        )
        self.frame_age = Histogram(
            "endostream_frame_age_seconds",
            "Stream frame age when its result is ready (capture by the reader -> result encoded).",
            ["stream"],
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.stream_fps = Gauge(
            "endostream_stream_fps", "Frames per second decoded from each stream.", ["stream"], registry=r
        )
        self.stream_up = Gauge(
            "endostream_stream_up", "1 while a stream delivers frames, else 0.", ["stream"], registry=r
        )
        self.reconnects = Counter(
            "endostream_stream_reconnects_total", "Stream reconnect attempts.", ["stream"], registry=r
        )
        self.streams_active = Gauge("endostream_streams_active", "Streams being read.", registry=r)
        self.ready = Gauge("endostream_ready", "1 once the engine is loaded and warmed, else 0.", registry=r)
        self.model_info = Gauge(
            "endostream_model_info",
            "The served model (always 1).",
            ["name", "family", "version", "backend", "device", "precision"],
            registry=r,
        )
        self.engine_warmup = Gauge(
            "endostream_engine_warmup_seconds", "Time spent loading and warming the engine.", registry=r
        )
        self.label_switches = Counter(
            "endostream_activity_label_switches_total",
            "Changes of the activity label between consecutive results of one stream, WebSocket connection or HTTP "
            "session (answer: frame = the per-frame label, temporal = the temporal head's); rate x 60 = flicker "
            "per minute. Counted where a temporal head runs.",
            ["source_kind", "answer"],
            registry=r,
        )
        self.temporal_sessions = Gauge(
            "endostream_temporal_sessions", "HTTP sessions holding a temporal state.", registry=r
        )
        self.temporal_evictions = Counter(
            "endostream_temporal_sessions_evicted_total",
            "HTTP sessions' temporal states dropped, by reason (expired: idle past the TTL; capacity: the LRU bound).",
            ["reason"],
            registry=r,
        )
        for stage in STAGES:  # series exist from the start: dashboards and alerts see zeros, not "no data"
            self.stage_duration.labels(stage)
        for source in SOURCES:
            self.frame_latency.labels(source)
            for outcome in ("processed", "dropped", "failed"):
                self.frames.labels(outcome, source)
            self.dropped.labels("stale", source)
            for answer in ("frame", "temporal"):
                self.label_switches.labels(source, answer)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for reason in ("expired", "capacity"):
            self.temporal_evictions.labels(reason)

    def forget_stream(self, stream: str) -> None:
        """Drop a finished stream's series so ids of past streams do not pile up."""
        for metric in (self.frame_age, self.stream_fps, self.stream_up, self.reconnects):
            try:
                metric.remove(stream)
            except KeyError:
                pass
