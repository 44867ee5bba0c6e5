"""The ONNX exporter's chatty loggers, held at ERROR while a graph is exported (every export logs pages of
registration and IR notes at INFO that say nothing about the bundle)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# loggers of the exporter stack that report every rewrite (INFO) or torchvision ops we never use (WARNING)
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx._internal.exporter._registration")


@contextlib.contextmanager
def quiet_exporter_logs() -> Iterator[None]:
    """Raise the exporter's loggers to ERROR for the block; their levels are restored after it."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
