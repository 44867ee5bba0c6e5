"""The service in this process: uvicorn on one worker, until SIGTERM or Ctrl-C (`endostream serve` and `demo` call it).

One process on purpose: the engine (and its GPU memory) is owned by one worker thread; scale out with more
containers, not more uvicorn workers.
"""

from __future__ import annotations

import logging

from service.settings import Settings

logger = logging.getLogger("endostream.service")


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
