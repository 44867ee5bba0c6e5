"""The real service as a separate process on loopback, with test defaults (one engine thread)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from service.launcher import ServiceProcess, free_port

__all__ = ["ServerProcess", "free_port"]


class ServerProcess(ServiceProcess):
    def __init__(self, bundle: Path, *, env: Mapping[str, str] | None = None, args: list[str] | None = None) -> None:
        super().__init__(bundle, env={"ENDOSTREAM_THREADS": "1", **(env or {})}, args=args or [])

    def start(self, log_dir: Path, timeout: float = 60.0) -> ServerProcess:
        super().start(log_dir, timeout)
        return self
