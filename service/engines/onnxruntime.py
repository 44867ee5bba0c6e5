"""ONNX Runtime backend: the bundle's graph (`model.onnx`, or the INT8 graph an INT8 bundle names) in one session.

CPU runs the CPU execution provider; CUDA runs the CUDA provider, preceded by ORT's TensorRT provider when the
installed onnxruntime has it (its engines are cached next to the bundle or in `engine_cache`). The graph runs at the
precision it was exported in: fp16/bf16 are the tensorrt and torch backends' job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle import Bundle
from service.engines._common import check_frames
from service.engines.base import EngineOptions, EngineUnavailable

logger = logging.getLogger(__name__)

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"
ORT_TRT_CACHE = "ort-trt-cache"  # folder for ORT's own TensorRT engines (not the `endostream export trt` ones)


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise EngineUnavailable(
            "onnxruntime is not installed: `pip install 'endostream[serve]'` (CPU) or `pip install onnxruntime-gpu`"
        ) from err
    return onnxruntime


def cuda_available() -> bool:
    """Whether the installed onnxruntime has a CUDA execution provider (says nothing about a GPU being present)."""
    try:
        return CUDA_EP in _import_onnxruntime().get_available_providers()
    except EngineUnavailable:
        return False


def choose_providers(
    device: str, available: list[str], precision: str, trt_cache: Path
) -> tuple[str, list[str | tuple[str, dict[str, Any]]]]:
    """(resolved device, providers in priority order) for `device` given the providers onnxruntime offers.

    Raises:
        EngineUnavailable: `device="cuda"` and this onnxruntime has no CUDA provider.
    """
    if device == "auto":
        device = "cuda" if CUDA_EP in available else "cpu"
    if device == "cpu":
        return "cpu", [CPU_EP]
    if device != "cuda":
        raise ValueError(f"device {device!r} is not one of 'auto', 'cpu', 'cuda'")
    if CUDA_EP not in available:
        raise EngineUnavailable(
            f"onnxruntime has no CUDA provider (it offers {available}): `pip uninstall onnxruntime && "
            f"pip install onnxruntime-gpu` on a machine with an NVIDIA GPU, or serve with device cpu"
        )
    providers: list[str | tuple[str, dict[str, Any]]] = []
    if TENSORRT_EP in available:
        trt_options = {
            "trt_engine_cache_enable": True,  # an engine build takes minutes: once per GPU + graph, not per start
            "trt_engine_cache_path": str(trt_cache),
            "trt_timing_cache_enable": True,
            "trt_fp16_enable": False,  # run the graph at its own precision, like the other providers
            "trt_int8_enable": precision == "int8",
        }
        providers.append((TENSORRT_EP, trt_options))
    providers += [CUDA_EP, CPU_EP]
    return "cuda", providers


class OnnxRuntimeEngine:
    """An `Engine` on one ONNX Runtime session (sequential execution, every graph optimisation)."""

    backend = "onnxruntime"

    def __init__(self, bundle: Bundle, options: EngineOptions | None = None) -> None:
        """
        Args:
            bundle: a loaded bundle; its manifest's `model_file` is the graph that runs.
            options: device, threads (intra-op; 0 = onnxruntime's default), precision ("auto" or the bundle's).

        Raises:
            EngineUnavailable: onnxruntime missing, no CUDA provider for `device="cuda"`, or a precision this graph
                does not have.
        """
        options = options or EngineOptions()
        ort = _import_onnxruntime()
        own = bundle.manifest.precision
        if options.precision not in ("auto", own):
            raise EngineUnavailable(
                f"onnxruntime runs the bundle's {own} graph as it is, not precision {options.precision!r}: "
                f"for int8 serve an `endostream export quantize` bundle, for fp16/bf16 the tensorrt or torch backend"
            )
        trt_cache = Path(options.engine_cache) if options.engine_cache else bundle.path / ORT_TRT_CACHE
        device, providers = choose_providers(options.device, ort.get_available_providers(), own, trt_cache)
        if any(isinstance(p, tuple) for p in providers):
            trt_cache.mkdir(parents=True, exist_ok=True)
        session_options = ort.SessionOptions()
        if options.threads > 0:
            session_options.intra_op_num_threads = options.threads
        # ORT's default is to spin; off, its threads sleep between calls and leave the cores to decoding and clients
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin_wait else "0")
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(str(bundle.model_path), session_options, providers=providers)
        active = self._session.get_providers()
        if device == "cuda" and CUDA_EP not in active and TENSORRT_EP not in active:
            # onnxruntime falls back to CPU silently when the CUDA libraries do not load
            raise EngineUnavailable(
                f"onnxruntime could not start its CUDA provider (active: {active}): install the CUDA and cuDNN "
                f"libraries onnxruntime-gpu {ort.__version__} needs, or serve with device cpu"
            )
        self._bundle = bundle
        self._input = bundle.manifest.input.name
        self.device = "cuda:0" if device == "cuda" else "cpu"
        self.precision = own
        self.output_names = tuple(o.name for o in self._session.get_outputs())
        self.providers = tuple(active)
        self.spin_wait = options.spin_wait
        logger.info("onnxruntime %s: %s on %s (%s)", ort.__version__, bundle.model_path.name, self.device, active)

    def run(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        frames = check_frames(frames, self._bundle)
        outputs = self._session.run(None, {self._input: frames})
        return dict(zip(self.output_names, outputs, strict=True))

    def close(self) -> None:
        self._session = None
