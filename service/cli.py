"""`endostream serve`: flags on top of `ENDOSTREAM_*` environment settings, then uvicorn on one worker process.

One process on purpose: the engine (and its GPU memory) is owned by one worker thread; scale out with more
containers, not more uvicorn workers.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.settings import DEFAULT_BUNDLE, Settings

logger = logging.getLogger("endostream.service")

# flag -> settings field; every flag defaults to None so only what the user typed overrides the environment
FLAGS: dict[str, str] = {
    "bundle": "bundle",
    "host": "host",
    "port": "port",
    "backend": "backend",
    "device": "device",
    "precision": "precision",
    "threads": "threads",
    "max_batch": "max_batch",
    "max_queue_delay_ms": "max_queue_delay_ms",
    "queue_limit": "queue_limit",
    "stream_allowlist": "stream_allowlist",
    "decode": "decode",
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, help=f"bundle folder (env ENDOSTREAM_BUNDLE; default {DEFAULT_BUNDLE})")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"], help="default auto")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    parser.add_argument("--precision", help="fp32|fp16|bf16|int8 where the backend supports it (default: bundle's)")
    parser.add_argument("--threads", type=int, help="engine CPU threads (0: backend default)")
    parser.add_argument("--max-batch", type=int, help="largest dynamic batch; 1 disables batching (default 8)")
    parser.add_argument("--max-queue-delay-ms", type=float, help="longest wait for a batch to fill (default 2)")
    parser.add_argument("--queue-limit", type=int, help="frames waiting before 503 (default 64)")
    parser.add_argument("--stream-allowlist", help="comma-separated URL prefixes allowed as stream sources")
    parser.add_argument(
        "--decode", choices=["auto", "cpu", "cuda"], help="JPEG decoding: auto = on the GPU when the engine runs there"
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment first, then the flags the user gave."""
    overrides: dict[str, Any] = {
        field: getattr(args, flag) for flag, field in FLAGS.items() if getattr(args, flag, None) is not None
    }
    try:
        base = Settings()
        return Settings.model_validate({**base.model_dump(), **overrides})
    except ValidationError as err:  # one line per bad value, naming the variable or flag, instead of a traceback
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"invalid settings (ENDOSTREAM_* variables or flags): {problems}") from None


def run_serve(settings: Settings) -> int:
    """Serve until interrupted; the exit status: 0 after a graceful shutdown (SIGTERM included), 1 when the engine
    failed to start. Raises FileNotFoundError/ValueError for a missing or broken bundle."""
    import uvicorn

    from service.app import create_app
    from service.lifecycle import GracefulServer, exit_zero_on_sigterm
    from service.logfilter import redact_root_handlers, uvicorn_log_config

    secrets = [settings.api_token] if settings.api_token else []
    redact_root_handlers(secrets)
    app = create_app(settings)
    state = app.state.endostream
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(secrets),  # masks ?token= in handshake and access lines
        access_log=False,  # per-request lines at 30 fps drown the log; /metrics has the numbers
        ws_max_size=settings.max_upload_bytes,
        # frames are JPEG/PNG already: deflating them again costs ~10 ms of CPU per 1080p frame on each side for
        # nothing (and results are small); clients that offer permessage-deflate simply get it declined
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=5,
    )
    server = GracefulServer(config, on_shutdown=state.streams_api.drain)
    state.on_fatal = server.request_exit
    logger.info("serving %s on http://%s:%d (docs /docs, viewer /)", settings.bundle, settings.host, settings.port)
    with exit_zero_on_sigterm():
        server.run()
    return 1 if state.batcher.startup_error is not None else 0
