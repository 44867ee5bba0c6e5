"""Process lifecycle around uvicorn: fail fast when the engine cannot start, drain live streams on shutdown, and
exit 0 after a graceful SIGTERM.

- A bundle whose graph cannot be opened leaves a process that answers but will never be ready; a liveness probe
  would keep it forever. `watch_engine` asks the server to exit instead, and `endostream serve` then exits 1.
- uvicorn waits up to `timeout_graceful_shutdown` for open connections, then cancels them: a live NDJSON stream
  never ends on its own, so it would be cut without its final line. `GracefulServer` ends every stream first.
- After a graceful shutdown uvicorn re-raises the signal it caught so that the default action (death by signal,
  exit status 143 for SIGTERM) happens. For an orchestrator a drained SIGTERM is a success, so `exit_zero_on_sigterm`
  installs the handler uvicorn restores and re-raises into.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn

from service.batcher import Batcher

logger = logging.getLogger(__name__)


async def watch_engine(batcher: Batcher, on_failure: Callable[[], None] | None, poll_s: float = 0.2) -> None:
    """Wait until the engine is ready or failed; on failure log one line and call `on_failure` (stop serving)."""
    while batcher.startup_error is None and not batcher.ready:
        await asyncio.sleep(poll_s)
    err = batcher.startup_error
    if err is None:
        return
    logger.error(
        "the engine failed to start, so this process will never be ready (%s: %s); fix or re-export the bundle, "
        "or choose another ENDOSTREAM_BACKEND%s",
        type(err).__name__,
        str(err).splitlines()[0] if str(err) else "",
        "; exiting" if on_failure is not None else "; /healthz answers 503",
    )
    if on_failure is not None:
        on_failure()


class GracefulServer(uvicorn.Server):
    """A uvicorn server that runs `on_shutdown` (end the live streams) before it waits for connections to close."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    def request_exit(self) -> None:
        """Begin a graceful shutdown (from the event loop), as SIGTERM would."""
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            self._on_shutdown()
        except Exception:  # a failing drain must not stop the shutdown itself
            logger.exception("draining the streams failed; shutting down anyway")
        await super().shutdown(sockets)


def _exit_zero(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


@contextlib.contextmanager
def exit_zero_on_sigterm() -> Iterator[None]:
    """While uvicorn serves, a SIGTERM it re-raises after draining ends the process with status 0, not 143."""
    previous = signal.signal(signal.SIGTERM, _exit_zero)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
