"""`endostream export trt`: TensorRT 10 engines from a bundle, named so that a mismatched engine is never loaded.

An engine only runs on the GPU architecture and TensorRT version it was built with, for the graph it was built from,
so its file name carries all three plus the build settings:

    model.sm<compute capability>.trt<version>.<precision>.b<max batch>.<first 16 hex of the ONNX sha256>.plan

A name that exists is a valid cache hit; anything else is built (never loaded and hoped for). The builder uses one
optimisation profile for batch 1..max (optimum at `opt_batch`), a workspace limit, the precision flags and a timing
cache per GPU architecture and TensorRT version kept next to the bundle, so rebuilds (another max batch, another
precision) reuse the kernel timings.

Everything that does not need TensorRT (settings, profile shapes, names, builder configuration against the API, the
errors) is plain Python; `tensorrt` is imported only when an engine is really built.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from export.manifest import InputSpec, Manifest, read_manifest, write_manifest

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
MIN_TRT_MAJOR = 10


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing: engines cannot be built or run here."""


def require_tensorrt() -> ModuleType:
    """Import TensorRT 10+, or raise `TensorRTUnavailable` saying what to install and what to use meanwhile."""
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTUnavailable(
            "TensorRT is not installed: on a machine with an NVIDIA GPU run `pip install 'endostream[gpu]'` "
            "(TensorRT 10+); without one, serve the bundle with the onnxruntime backend"
        ) from err
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < MIN_TRT_MAJOR:
        raise TensorRTUnavailable(f"TensorRT {tensorrt.__version__} is too old: endostream needs {MIN_TRT_MAJOR}+")
    return tensorrt


def cuda_compute_capability() -> str:
    """Compute capability of the current CUDA device as digits ("90" for an H100); raises when there is none."""
    try:
        import torch
    except ImportError as err:  # the engine builder reads the device through torch's CUDA runtime
        raise TensorRTUnavailable("reading the GPU needs torch with CUDA: pip install 'endostream[train]'") from err
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


@dataclass(frozen=True)
class EngineSettings:
    precision: str = "fp16"
    max_batch: int = 8
    opt_batch: int | None = None  # default: half of max_batch (at least 1)
    workspace_gb: float = 4.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.opt_batch is not None and not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"opt_batch {self.opt_batch} must lie in 1..max_batch ({self.max_batch})")
        if self.workspace_gb <= 0:
            raise ValueError(f"--workspace must be positive (GB), got {self.workspace_gb}")

    @property
    def optimum(self) -> int:
        return self.opt_batch or max(1, self.max_batch // 2)


def profile_shapes(spec: InputSpec, settings: EngineSettings) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of the frames input: batch 1, the optimum and the maximum at the bundle size."""
    if spec.layout != "NHWC":
        raise ValueError(f"bundle input layout {spec.layout!r} is not supported (expected NHWC)")
    frame = (spec.height, spec.width, 3)
    return (1, *frame), (settings.optimum, *frame), (settings.max_batch, *frame)


def engine_filename(model_sha256: str, compute_capability: str, trt_version: str, settings: EngineSettings) -> str:
    """The engine's cache key as a file name (see the module docstring)."""
    return (
        f"model.sm{compute_capability}.trt{trt_version}.{settings.precision}.b{settings.max_batch}."
        f"{model_sha256[:16]}.plan"
    )


def timing_cache_filename(compute_capability: str, trt_version: str) -> str:
    return f"timing.sm{compute_capability}.trt{trt_version}.cache"


def check_precision(manifest: Manifest, settings: EngineSettings) -> None:
    """INT8 engines come from the QDQ bundle (`endostream export quantize`); the fp32 graph builds the others."""
    if settings.precision == "int8" and manifest.precision != "int8":
        raise ValueError("--int8 builds from an INT8 (QDQ) bundle: run `endostream export quantize` first")
    if settings.precision != "int8" and manifest.precision != "fp32":
        raise ValueError(f"{settings.precision} engines build from the fp32 bundle, not this {manifest.precision} one")


def configure_builder(trt: Any, builder: Any, config: Any, spec: InputSpec, settings: EngineSettings) -> None:
    """Workspace limit, precision flags and the batch optimisation profile on a TensorRT builder config."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gb * (1 << 30)))
    flags = {"fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8", "FP16"]}.get(settings.precision, [])
    for flag in flags:  # int8: the QDQ layers run in INT8, the rest may use FP16 instead of FP32
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.name, *profile_shapes(spec, settings))
    config.add_optimization_profile(profile)


def _progress_monitor(trt: ModuleType) -> Any:
    """A TensorRT progress monitor that logs each top-level build phase as it starts and ends."""

    class PhaseLogger(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.started[phase_name] = time.perf_counter()
            if parent_phase is None:
                logger.info("TensorRT: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            seconds = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
            logger.debug("TensorRT: %s done in %.1f s", phase_name, seconds)

    return PhaseLogger()


def build_engine(bundle: Path, settings: EngineSettings, *, force: bool = False) -> Path:
    """Build (or find) the engine of `bundle` for this GPU and TensorRT; returns its path and lists it in the manifest.

    Raises:
        TensorRTUnavailable: no TensorRT or no GPU.
        ValueError: the ONNX parser or the builder failed (parser errors are listed).
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    check_precision(manifest, settings)
    trt = require_tensorrt()
    capability = cuda_compute_capability()
    path = bundle / engine_filename(manifest.model_sha256, capability, trt.__version__, settings)
    if path.is_file() and not force:
        logger.info("engine up to date: %s", path)
        return path
    started = time.perf_counter()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(bundle / manifest.model_file)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ValueError(f"TensorRT could not parse {bundle / manifest.model_file}: {errors}")
    config = builder.create_builder_config()
    configure_builder(trt, builder, config, manifest.input, settings)
    cache_path = bundle / timing_cache_filename(capability, trt.__version__)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt)
    config.progress_monitor = monitor
    logger.info("building %s engine (batch 1..%d) for sm%s", settings.precision, settings.max_batch, capability)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(f"TensorRT failed to build an engine from {bundle}; rerun with -v for the builder log")
    path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - started
    manifest.engines = [e for e in manifest.engines if e.get("file") != path.name]
    manifest.engines.append(
        {
            "file": path.name,
            "sm": capability,
            "tensorrt": trt.__version__,
            "seconds": round(seconds, 1),
            **asdict(settings),
        }
    )
    write_manifest(bundle, manifest)
    logger.info("engine written to %s in %.0f s", path, seconds)
    return path
