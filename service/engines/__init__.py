"""Engines: open a bundle on a backend (`open_engine`), warm it up (`warm_up`), list what can run here.

`auto` takes the fastest backend this machine can run, in order: TensorRT (an engine built for this GPU), ONNX
Runtime with its CUDA provider, the torch program on CUDA, ONNX Runtime on CPU. Each skipped backend is logged
with the reason. Backends import their packages (onnxruntime, torch, tensorrt) only when they are opened.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from service.bundle import Bundle, load_bundle
from service.engines._common import nvidia_driver_present
from service.engines.base import BackendName, Device, Engine, EngineOptions, EngineUnavailable

__all__ = [
    "BackendName",
    "Engine",
    "EngineOptions",
    "EngineUnavailable",
    "available_backends",
    "check_outputs",
    "open_engine",
    "warm_up",
]

logger = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "onnxruntime", "torch")


def _open(bundle: Bundle, backend: str, options: EngineOptions) -> Engine:
    if backend == "onnxruntime":
        from service.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(bundle, options)
    if backend == "torch":
        from service.engines.torch_backend import TorchEngine

        return TorchEngine(bundle, options)
    if backend == "tensorrt":
        from service.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(bundle, options)
    raise ValueError(f"backend {backend!r} is not one of {('auto', *BACKENDS)}")


# (backend, device) in the order `auto` tries them
AUTO_ORDER: tuple[tuple[str, Device], ...] = (
    ("tensorrt", "cuda"),
    ("onnxruntime", "cuda"),
    ("torch", "cuda"),
    ("onnxruntime", "cpu"),
)


def _skip_reason(bundle: Bundle, backend: str, device: str, asked: str) -> str:
    """Why `auto` does not even try `backend` on `device` (cheap checks, nothing imported); "" to try it."""
    if device == "cuda":
        if asked == "cpu":
            return "device cpu was asked"
        if not nvidia_driver_present():
            return "no NVIDIA driver on this machine"
        if backend == "torch" and bundle.torch_program_path is None:
            return "the bundle has no model.pt2 (export it with --torch-program)"
    elif asked == "cuda":
        return "device cuda was asked"
    return ""


def open_engine(
    bundle: Bundle | Path | str, backend: BackendName = "auto", options: EngineOptions | None = None
) -> Engine:
    """Open `bundle` on `backend` ("auto": the fastest that runs here, see the module docstring).

    Raises:
        EngineUnavailable: the backend cannot run here (the message says what to install or build); for "auto",
            none could, and every backend's reason is listed.
        ValueError: an unknown backend name or device, or task outputs the graph lacks (`check_outputs`).
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    engine = _open_any(bundle, backend, options or EngineOptions())
    try:
        check_outputs(bundle, engine)
    except ValueError:
        engine.close()
        raise
    return engine


def check_outputs(bundle: Bundle, engine: Engine) -> None:
    """ValueError naming every output the manifest's tasks read that the engine's graph does not produce.

    Warm-up only runs the graph; without this check such a bundle would report ready and fail every request.
    """
    tasks = bundle.manifest.tasks
    wanted = [t.output for t in tasks] + [t.logits_output for t in tasks if t.logits_output]
    # the temporal head's input is one of these (bundle.py checks that at load)
    wanted += [t.features_output for t in tasks if t.features_output]
    missing = [name for name in wanted if name not in engine.output_names]
    if missing:
        raise ValueError(
            f"{bundle.path}: the manifest's tasks read outputs {missing} that the graph lacks (it has "
            f"{list(engine.output_names)}); fix the task `output` names in manifest.json or re-export the bundle"
        )


def _open_any(bundle: Bundle, backend: BackendName, options: EngineOptions) -> Engine:
    if backend != "auto":
        return _open(bundle, backend, options)
    reasons = []
    for name, device in AUTO_ORDER:
        label = f"{name} ({device})"
        reason = _skip_reason(bundle, name, device, options.device)
        if not reason:
            try:
                engine = _open(bundle, name, replace(options, device=device))
            except EngineUnavailable as err:
                reason = str(err)
            else:
                logger.info("backend auto: %s", label)
                return engine
        logger.info("backend auto: skipping %s: %s", label, reason)
        reasons.append(f"{label}: {reason}")
    raise EngineUnavailable(f"no backend can run {bundle.path} here: " + " | ".join(reasons))


def available_backends() -> list[str]:
    """Backends whose packages are installed (found, not imported); whether one runs a bundle depends on the GPU."""
    found = []
    if importlib.util.find_spec("tensorrt") and importlib.util.find_spec("torch") and nvidia_driver_present():
        found.append("tensorrt")
    if importlib.util.find_spec("onnxruntime"):
        found.append("onnxruntime")
    if importlib.util.find_spec("torch"):
        found.append("torch")
    return found


def warm_up(
    engine: Engine, height: int, width: int, batches: Sequence[int] = (1,), runs: int = 3, seed: int = 0
) -> dict[int, float]:
    """Run zero frames, then noise frames, `runs` times per batch size; returns the last call's seconds per batch.

    The first calls pay for lazy work (allocation, kernel selection, CUDA graph capture); a service is ready only
    after them. Pass every batch size the service will send so each one is captured before traffic arrives.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    rng = np.random.default_rng(seed)
    seconds: dict[int, float] = {}
    for batch in batches:
        zeros = np.zeros((batch, height, width, 3), dtype=np.uint8)
        engine.run(zeros)  # constant input first: the cheapest way to trigger every lazy step
        for _ in range(runs):
            noise = rng.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)
            start = time.perf_counter()
            engine.run(noise)
            seconds[batch] = time.perf_counter() - start
        logger.info("warm-up batch %d: %.1f ms", batch, seconds[batch] * 1000)
    return seconds
