"""What the lifespan builds and the routes use, kept together on `app.state.endostream`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.batcher import Batcher
from service.bundle import Bundle
from service.metrics import ServiceMetrics
from service.serving import InferenceService
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    bundle: Bundle
    metrics: ServiceMetrics
    batcher: Batcher
    service: InferenceService
    streams_api: Any  # service.streaming.StreamsApi (typed loosely: it imports the serving layer)
    on_fatal: Callable[[], None] | None = None  # set by `endostream serve`: stop serving (the engine cannot start)
