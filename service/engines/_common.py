"""Small helpers every backend shares: frame checks, device resolution, a torch-free look for an NVIDIA driver."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from service.bundle import Bundle
from service.engines.base import EngineUnavailable


def check_frames(frames: np.ndarray, bundle: Bundle) -> np.ndarray:
    """`frames` as a C-contiguous uint8 B x H x W x 3 array at the bundle size; ValueError naming any mismatch."""
    spec = bundle.manifest.input
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (spec.height, spec.width, 3):
        raise ValueError(
            f"frames must be uint8 B x {spec.height} x {spec.width} x 3 (RGB, the bundle size), "
            f"got {frames.dtype} {tuple(frames.shape)}: resize frames before calling the engine"
        )
    if frames.shape[0] < 1:
        raise ValueError("frames holds no frame (batch 0)")
    return np.ascontiguousarray(frames)


def check_frame_tensor(frames: Any, bundle: Bundle) -> Any:
    """A torch uint8 B x H x W x 3 tensor at the bundle size (GPU-decoded frames); ValueError naming any mismatch."""
    spec = bundle.manifest.input
    if (
        str(frames.dtype) != "torch.uint8"
        or frames.dim() != 4
        or tuple(frames.shape[1:]) != (spec.height, spec.width, 3)
    ):
        raise ValueError(
            f"frames must be uint8 B x {spec.height} x {spec.width} x 3 (RGB, the bundle size), "
            f"got {frames.dtype} {tuple(frames.shape)}: resize frames before calling the engine"
        )
    if frames.shape[0] < 1:
        raise ValueError("frames holds no frame (batch 0)")
    return frames


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is loaded, checked without importing torch or CUDA libraries.

    Lets `auto` skip the CUDA backends on CPU machines without paying for a torch import. Only Linux (and WSL) can
    be answered from the file system; elsewhere this says True and the backend's own CUDA check decides.
    """
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/dxg")


def resolve_precision(requested: str, supported: tuple[str, ...], default: str, backend: str) -> str:
    """`requested` ("auto" -> `default`) if the backend supports it, else EngineUnavailable listing what it does."""
    precision = default if requested == "auto" else requested
    if precision not in supported:
        raise EngineUnavailable(
            f"the {backend} backend cannot run precision {requested!r} here: choose one of {list(supported)} "
            f"or another backend"
        )
    return precision
