"""PyTorch backend: the bundle's `torch.export` program (`model.pt2`), no training code involved.

The program is the exporter's graph wrapper with fused SDPA attention kept. On CUDA it runs in fp32, or in fp16/bf16
under `torch.autocast`, and can replay CUDA graphs: one per batch size, captured the first time that size is seen (up
to `max_batch`) after a warm-up on a side stream, with static input and output buffers
(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs). On CPU it runs fp32 or bf16 (CPU autocast); fp16 on
CPU is refused, since PyTorch's CPU fp16 kernels are slower than fp32 and there is nothing to gain.

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
from service.engines.base import EngineOptions, EngineUnavailable

logger = logging.getLogger(__name__)

CUDA_PRECISIONS = ("fp32", "fp16", "bf16")
CPU_PRECISIONS = ("fp32", "bf16")
CUDA_GRAPH_WARMUP = 3  # eager calls on a side stream before capture (cuDNN/cuBLAS autotuning, lazy allocations)


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
        self.input.copy_(frames)
        self.graph.replay()
        return self.outputs


class TorchEngine:
    """An `Engine` on the bundle's `torch.export` program (eager, or CUDA graph replay on CUDA)."""

    backend = "torch"

    def __init__(self, bundle: Bundle, options: EngineOptions | None = None) -> None:
        """
        Args:
            bundle: a loaded bundle exported with `--torch-program`.
            options: device, threads (torch intra-op threads, process-wide), precision ("auto" = fp32),
                cuda_graphs and max_batch (batch sizes above it run eagerly).

        Raises:
            EngineUnavailable: no or stale `model.pt2`, torch missing, CUDA asked without a GPU, or a precision the
                device does not run.
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
        self._module = program.module()
        self._bundle = bundle
        self._frame_shape = (bundle.manifest.input.height, bundle.manifest.input.width, 3)
        self._autocast = self._autocast_factory()
        self._use_graphs = device == "cuda" and options.cuda_graphs
        self._max_graph_batch = options.max_batch
        self._graphs: dict[int, _CapturedBatch] = {}
        self._pool: Any = None
        self.device = str(self._device)
        self.output_names = tuple(record["outputs"])
        logger.info(
            "torch %s: %s on %s (%s%s)",
            torch.__version__,
            TORCH_PROGRAM_FILE,
            self.device,
            self.precision,
            ", CUDA graphs" if self._use_graphs else "",
        )

    def _autocast_factory(self) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        torch = self._torch
        if self.precision == "fp32":
            return contextlib.nullcontext
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
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
                logger.warning("CUDA graph capture failed at batch %d (%s); running eagerly from now on", batch, err)
                self._use_graphs = False
                self._graphs.clear()
                return None
            logger.info("captured a CUDA graph for batch %d", batch)
        return self._graphs[batch]

    def run(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        frames = check_frames(frames, self._bundle)
        captured = self._captured(frames.shape[0])
        with torch.inference_mode():
            x = torch.from_numpy(frames)
            if captured is not None:
                outputs = captured.replay(x)
            else:
                with self._autocast():
                    outputs = self._module(x.to(self._device))
            # float outputs back to float32 (the engine contract; numpy has no bf16); .cpu() waits for the GPU
            arrays = [(t.float() if t.is_floating_point() else t).cpu().numpy() for t in outputs]
        if len(arrays) != len(self.output_names):
            raise RuntimeError(
                f"{TORCH_PROGRAM_FILE} returned {len(arrays)} outputs, the manifest names "
                f"{list(self.output_names)}: re-export the bundle"
            )
        return dict(zip(self.output_names, arrays, strict=True))

    def close(self) -> None:
        cuda = self._device.type == "cuda"
        self._graphs.clear()
        self._module = None
        self._pool = None
        if cuda:
            self._torch.cuda.empty_cache()
