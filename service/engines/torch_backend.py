"""PyTorch backend: the bundle's `torch.export` program (`model.pt2`), no training code involved.

The program is the exporter's graph wrapper with fused SDPA attention kept. On CUDA it runs in fp32, or in fp16/bf16
under `torch.autocast`, and can replay CUDA graphs: one per batch size, captured the first time that size is seen (up
to `max_batch`) after a warm-up on a side stream, with static input and output buffers
(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs). On CPU it runs fp32 or bf16 (CPU autocast); fp16 on
CPU is refused, since PyTorch's CPU fp16 kernels are slower than fp32 and there is nothing to gain.

Low precision is autocast, not a half-precision copy of the program: the exported graph converts the uint8 frames to
float32 itself and keeps its norms and softmax in float32, which autocast respects. What autocast costs per call,
re-casting every GEMM/conv weight, is removed by casting those weights once at load (`_torch_precast`, bit-identical).

`compile` wraps the program in `torch.compile` (Inductor) with frozen weights, so Inductor folds the remaining casts
and constants at compile time. Inductor's own CUDA graphs ("reduce-overhead") stay off: this engine captures one graph
per batch size itself, around the compiled code, which covers eager and compiled runs alike, and a graph captured by
Inductor inside our capture would fail. The batch dimension is compiled dynamic after the second size seen (batch 1
keeps its own specialised kernels), so the batch sizes between 1 and `max_batch` need no recompilation.

Frames come in as numpy or as a uint8 `torch.Tensor`; a tensor already on the engine's device (from the GPU frame
decoder) is copied device to device into the graph's input, never through the host. Outputs go to the host once per
call: every output is queued as an asynchronous copy into pinned memory, then one synchronisation waits for all.

torch is imported when an engine is opened, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from service.bundle import TORCH_PROGRAM_FILE, Bundle, sha256_file
from service.engines._common import check_frames, resolve_precision
from service.engines._torch_precast import precast_gemm_weights
from service.engines.base import CompileMode, EngineOptions, EngineUnavailable

logger = logging.getLogger(__name__)

CUDA_PRECISIONS = ("fp32", "fp16", "bf16")
CPU_PRECISIONS = ("fp32", "bf16")
CUDA_GRAPH_WARMUP = 3  # eager calls on a side stream before capture (cuDNN/cuBLAS autotuning, lazy allocations)
COMPILE_MODES: tuple[CompileMode, ...] = ("off", "default", "max-autotune")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as err:
        raise EngineUnavailable(
            "the torch backend needs PyTorch: `pip install torch` (with CUDA for GPUs), or use the onnxruntime backend"
        ) from err
    return torch


def program_record(bundle: Bundle) -> dict[str, Any]:
    """The manifest's record of `model.pt2`, checked against the file; raises EngineUnavailable saying to re-export."""
    reexport = (
        f"re-export the bundle with `endostream export onnx CHECKPOINT --out {bundle.path} --overwrite --torch-program`"
    )
    path = bundle.torch_program_path
    if path is None:
        raise EngineUnavailable(f"bundle {bundle.path} has no {TORCH_PROGRAM_FILE} for the torch backend: {reexport}")
    record = bundle.manifest.checks.get("torch_program")
    if not isinstance(record, dict) or "sha256" not in record or "outputs" not in record:
        raise EngineUnavailable(f"{bundle.path}/manifest.json does not record {TORCH_PROGRAM_FILE}: {reexport}")
    if sha256_file(path) != record["sha256"]:
        raise EngineUnavailable(f"{path} does not match the sha256 in the manifest (modified or stale): {reexport}")
    return record


class _CapturedBatch:
    """One CUDA graph for one batch size: static input, static outputs, replayed in place."""

    def __init__(
        self, torch: Any, module: Any, batch: int, frame_shape: tuple[int, ...], device: Any, autocast: Any, pool: Any
    ) -> None:
        self.input = torch.zeros((batch, *frame_shape), dtype=torch.uint8, device=device)
        # Warm up on a side stream so that one-time work (autotuning, workspace allocation) stays out of the capture.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode(), autocast():
            for _ in range(CUDA_GRAPH_WARMUP):
                module(self.input)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.inference_mode(), autocast():
            self.outputs = tuple(module(self.input))

    def replay(self, frames: Any) -> tuple[Any, ...]:
        # from the host: a pinned tensor copies asynchronously; run() synchronises before the next call reuses it
        self.input.copy_(frames, non_blocking=frames.device.type == "cpu" and frames.is_pinned())
        self.graph.replay()
        return self.outputs


class TorchEngine:
    """An `Engine` on the bundle's `torch.export` program (eager or compiled; CUDA graph replay on CUDA)."""

    backend = "torch"

    def __init__(self, bundle: Bundle, options: EngineOptions | None = None) -> None:
        """
        Args:
            bundle: a loaded bundle exported with `--torch-program`.
            options: device, threads (torch intra-op threads, process-wide), precision ("auto" = fp32),
                cuda_graphs and max_batch (batch sizes above it run without a graph), compile.

        Raises:
            EngineUnavailable: no or stale `model.pt2`, torch missing, CUDA asked without a GPU, or a precision the
                device does not run.
            ValueError: an unknown device or compile mode.
        """
        options = options or EngineOptions()
        record = program_record(bundle)
        torch = _import_torch()
        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable(
                f"torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda}): install a CUDA "
                f"build of torch on a GPU machine, check CUDA_VISIBLE_DEVICES, or serve with device cpu"
            )
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r} is not one of 'auto', 'cpu', 'cuda'")
        if options.compile not in COMPILE_MODES:
            raise ValueError(f"compile mode {options.compile!r} is not one of {list(COMPILE_MODES)}")
        supported = CUDA_PRECISIONS if device == "cuda" else CPU_PRECISIONS
        self.precision = resolve_precision(options.precision, supported, "fp32", f"torch ({device})")
        if record.get("torch") not in (None, torch.__version__):
            logger.warning(
                "%s was written by torch %s and is loaded by torch %s; re-export it if loading or results fail",
                TORCH_PROGRAM_FILE,
                record["torch"],
                torch.__version__,
            )
        if options.threads > 0:
            torch.set_num_threads(options.threads)  # process-wide in torch: the service runs one engine
        program = torch.export.load(str(bundle.torch_program_path))
        if device == "cuda":
            # moves weights and the constants baked into the graph; `module().to()` would miss the latter
            program = torch.export.passes.move_to_device_pass(program, "cuda")
            self._device = torch.device("cuda", torch.cuda.current_device())
        else:
            self._device = torch.device("cpu")
        self._torch = torch
        module = program.module()
        if self.precision != "fp32":
            cast = precast_gemm_weights(module, self._low_dtype())
            logger.debug("cast %d GEMM/conv weights to %s once", cast, self.precision)
        self.compile = options.compile
        self._module = self._compiled(module) if self.compile != "off" else module
        self._bundle = bundle
        self._frame_shape = (bundle.manifest.input.height, bundle.manifest.input.width, 3)
        self._autocast = self._autocast_factory()
        self._use_graphs = device == "cuda" and options.cuda_graphs
        self._max_graph_batch = options.max_batch
        self._graphs: dict[int, _CapturedBatch] = {}
        self._staging: dict[int, Any] = {}  # batch -> pinned host buffer for numpy frames (CUDA only)
        self._pool: Any = None
        self.device = str(self._device)
        self.output_names = tuple(record["outputs"])
        logger.info(
            "torch %s: %s on %s (%s%s%s)",
            torch.__version__,
            TORCH_PROGRAM_FILE,
            self.device,
            self.precision,
            ", CUDA graphs" if self._use_graphs else "",
            f", torch.compile {self.compile}" if self.compile != "off" else "",
        )

    @property
    def cuda_graphs(self) -> bool:
        """Whether calls up to max_batch replay CUDA graphs (not on CPU, when turned off, or after a failed capture)."""
        return self._use_graphs

    def _low_dtype(self) -> Any:
        return {"fp16": self._torch.float16, "bf16": self._torch.bfloat16}[self.precision]

    def _compiled(self, module: Any) -> Any:
        """`module` under torch.compile: Inductor, frozen weights, no Inductor CUDA graphs (we capture our own)."""
        options: dict[str, Any] = {"freezing": True, "triton.cudagraphs": False}
        if self.compile == "max-autotune":
            options.update({"max_autotune": True, "coordinate_descent_tuning": True})
        # compiling happens lazily at the first call of each batch specialisation (warm-up), not here
        return self._torch.compile(module, options=options, dynamic=None, fullgraph=True)

    def _autocast_factory(self) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        torch = self._torch
        if self.precision == "fp32":
            return contextlib.nullcontext
        dtype = self._low_dtype()
        # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture
        return lambda: torch.autocast(self._device.type, dtype=dtype, cache_enabled=False)

    def _captured(self, batch: int) -> _CapturedBatch | None:
        """The CUDA graph for `batch`, captured on first use; None when graphs are off or the capture failed."""
        if not self._use_graphs or batch > self._max_graph_batch:
            return None
        if batch not in self._graphs:
            torch = self._torch
            if self._pool is None:
                # One memory pool for all captures. Safe here: graphs replay one at a time on one stream and every
                # replay's outputs are copied to the host before the next replay can reuse their memory.
                self._pool = torch.cuda.graph_pool_handle()
            try:
                self._graphs[batch] = _CapturedBatch(
                    torch, self._module, batch, self._frame_shape, self._device, self._autocast, self._pool
                )
            except RuntimeError as err:
                logger.warning("CUDA graph capture failed at batch %d (%s); no graphs from now on", batch, err)
                self._use_graphs = False
                self._graphs.clear()
                return None
            logger.info("captured a CUDA graph for batch %d", batch)
        return self._graphs[batch]

    def _as_tensor(self, frames: Any) -> Any:
        """`frames` (numpy or torch) as a uint8 B x H x W x 3 tensor, on the host (pinned on CUDA) or the device."""
        torch = self._torch
        if not isinstance(frames, torch.Tensor):
            frames = check_frames(frames, self._bundle)
            if self._device.type == "cpu":
                return torch.from_numpy(frames)
            staging = self._staging.get(frames.shape[0])
            if staging is None:
                staging = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
                self._staging[frames.shape[0]] = staging
            staging.numpy()[...] = frames  # host memcpy; the upload from pinned memory is asynchronous
            return staging
        if frames.ndim == 3:
            frames = frames.unsqueeze(0)
        if frames.dtype != torch.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != self._frame_shape:
            height, width, _ = self._frame_shape
            raise ValueError(
                f"frames must be uint8 B x {height} x {width} x 3 (RGB, the bundle size), got {frames.dtype} "
                f"{tuple(frames.shape)} on {frames.device}: resize frames before calling the engine"
            )
        if frames.shape[0] < 1:
            raise ValueError("frames holds no frame (batch 0)")
        if frames.device.type != "cpu" and frames.device != self._device:
            frames = frames.to(self._device)  # another GPU: device-to-device, still no host round trip
        return frames

    def run(self, frames: np.ndarray | Any) -> dict[str, np.ndarray]:
        """Run one batch. `frames`: uint8 B x H x W x 3 numpy, or a torch tensor (also H x W x 3) on the host or the
        engine's device; a device tensor must be complete on the current stream (the decoder's work is ordered
        before the copy into the graph input). Returns numpy outputs by name, float outputs as float32."""
        torch = self._torch
        with torch.inference_mode():
            x = self._as_tensor(frames)
            captured = self._captured(x.shape[0])
            if captured is not None:
                outputs = captured.replay(x)
            else:
                with self._autocast():
                    outputs = self._module(x.to(self._device, non_blocking=True))
            arrays = self._to_host(outputs)
        if len(arrays) != len(self.output_names):
            raise RuntimeError(
                f"{TORCH_PROGRAM_FILE} returned {len(arrays)} outputs, the manifest names "
                f"{list(self.output_names)}: re-export the bundle"
            )
        return dict(zip(self.output_names, arrays, strict=True))

    def _to_host(self, outputs: tuple[Any, ...]) -> list[np.ndarray]:
        """Float outputs as float32 (the engine contract; numpy has no bf16), copied to the host with one wait."""
        torch = self._torch
        tensors = [t.float() if t.is_floating_point() and t.dtype != torch.float32 else t for t in outputs]
        if self._device.type == "cpu":
            return [t.numpy() for t in tensors]
        # Fresh pinned buffers from torch's caching host allocator (cheap after the first call): the returned arrays
        # keep their buffer alive, so the next call cannot overwrite results the caller still holds.
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for dst, src in zip(host, tensors, strict=True):
            dst.copy_(src, non_blocking=True)
        torch.cuda.current_stream(self._device).synchronize()
        return [t.numpy() for t in host]

    def close(self) -> None:
        cuda = self._device.type == "cuda"
        self._graphs.clear()
        self._staging.clear()
        self._module = None
        self._pool = None
        if cuda:
            self._torch.cuda.empty_cache()
