"""`endostream serve`: flags on top of the `ENDOSTREAM_*` environment settings, then the service in this process.

Only the service is imported (service/ never imports training/ or torch), so serving images need neither. Each flag
defaults to None so that only what the user typed overrides the environment.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

# flag dest -> settings field
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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="the inference service: HTTP, WebSocket and RTSP frames in, results out")
    add_serve_arguments(serve)
    serve.set_defaults(func=run)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from service.settings import DEFAULT_BUNDLE

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
    from pydantic import ValidationError

    from service.settings import Settings

    overrides: dict[str, Any] = {
        field: getattr(args, flag) for flag, field in FLAGS.items() if getattr(args, flag, None) is not None
    }
    try:
        base = Settings()
        return Settings.model_validate({**base.model_dump(), **overrides})
    except ValidationError as err:  # one line per bad value, naming the variable or flag, instead of a traceback
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"invalid settings (ENDOSTREAM_* variables or flags): {problems}") from None


def run(args: argparse.Namespace) -> int:
    from service.server import run_serve

    return run_serve(settings_from_args(args))
