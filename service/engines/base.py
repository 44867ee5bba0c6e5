"""The engine protocol: one object that owns a compiled model and turns a uint8 frame batch into graph outputs.

Every backend (ONNX Runtime, TensorRT, torch) runs the same bundle graph: input `frames` uint8 B x H x W x 3 RGB at
the bundle's size, outputs by name (`activity_probs` float32 B x K, `segmentation` uint8 B x H x W, ...). Engines
are not thread-safe: the service's batcher calls `run` from its single worker thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

BackendName = Literal["auto", "tensorrt", "onnxruntime", "torch"]
Device = Literal["auto", "cpu", "cuda"]
CompileMode = Literal["off", "default", "max-autotune"]


class EngineUnavailable(RuntimeError):
    """The backend cannot run here (package missing, no GPU, no engine for this GPU); says what to install or do."""


@dataclass(frozen=True)
class EngineOptions:
    """How to open an engine.

    Attributes:
        device: "cpu", "cuda" or "auto" (cuda when the backend can use it).
        threads: intra-op CPU threads (0: the backend's default).
        precision: "fp32" | "fp16" | "bf16" | "int8" where the backend supports it; "auto" keeps the bundle's.
        cuda_graphs: capture CUDA graphs for fixed batch sizes (torch and TensorRT on CUDA).
        max_batch: largest batch the service will send (sizes TensorRT profiles and CUDA graph captures).
        engine_cache: folder for built TensorRT engines (default: the bundle folder).
        spin_wait: ONNX Runtime's intra-op threads spin for work after each run instead of sleeping; saves about
            a millisecond per call when frames come back to back, but burns cores that decoding and other clients
            need (README "Choosing the settings").
        compile: torch backend only: "off" (the exported program as it is), "default" (`torch.compile` with
            Inductor, weights frozen) or "max-autotune" (also benchmarks GEMM/conv kernels at first call: minutes).
    """

    device: Device = "auto"
    threads: int = 0
    precision: str = "auto"
    cuda_graphs: bool = True
    max_batch: int = 8
    engine_cache: str | None = None
    spin_wait: bool = False
    compile: CompileMode = "off"


@runtime_checkable
class Engine(Protocol):
    """A loaded model ready to run. Attributes describe what actually runs (for `/model` and metrics)."""

    backend: str  # "onnxruntime" | "tensorrt" | "torch"
    device: str  # "cpu" | "cuda:0" ...
    precision: str  # "fp32" | "fp16" | "int8" ...
    output_names: tuple[str, ...]

    def run(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """frames: uint8 B x H x W x 3 (C-contiguous) -> graph outputs by name, batch-first numpy arrays.

        The torch engine also takes a uint8 `torch.Tensor` (B x H x W x 3 or H x W x 3) on its device or the CPU.
        """
        ...

    def close(self) -> None:
        """Release the model and any device memory; the engine is unusable afterwards."""
        ...
