"""Export mode: one switch that turns fused attention into plain, traceable operations.

timm's `set_exportable` / `use_fused_attn` (timm `layers/config.py`) is read when a layer is *built*; this flag is
read on every forward call instead, so it also applies to models that were built (and loaded) before export starts.
The flag is process-wide, like timm's: enter the context in the thread that runs the export.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_EXPORTABLE = False


def is_exportable() -> bool:
    """True inside `exportable()`: layers must use explicit operations instead of fused kernels."""
    return _EXPORTABLE


@contextmanager
def exportable(enabled: bool = True) -> Iterator[None]:
    """Run the enclosed forward passes in export mode (explicit softmax(QK^T)V attention instead of SDPA).

    Nests: the previous mode is restored on exit, also when the body raises.

    Args:
        enabled: the mode inside the context; `exportable(False)` re-enables fused kernels inside an outer context.
    """
    global _EXPORTABLE
    previous = _EXPORTABLE
    _EXPORTABLE = enabled
    try:
        yield
    finally:
        _EXPORTABLE = previous
