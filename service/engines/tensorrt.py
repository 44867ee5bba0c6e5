"""TensorRT backend: runs an engine that `endostream export trt` built for this GPU and this TensorRT version.

A serialized engine only runs on the GPU architecture and TensorRT version it was built with, for the graph it was
built from. The bundle manifest lists every engine with those keys (`file`, `sm`, `tensorrt`, `precision`,
`max_batch`; the graph hash is the tail of the file name), and this module loads only an entry that matches the
machine; anything else is refused with the command that builds the right one.

I/O follows the TensorRT 10 tensor-name API (`num_io_tensors`, `get_tensor_name`/`_mode`/`_dtype`,
`set_input_shape`, `set_tensor_address`, `execute_async_v3`): device buffers are torch CUDA tensors allocated per
tensor name and per batch size, and each batch size can be captured once as a CUDA graph and replayed. Design after
TensorRT's `samples/python/detectron2/infer.py` (one runtime object, buffers by tensor name).

The key matching is written here again on purpose: the service does not import the exporter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle import Bundle
from service.engines._common import check_frame_tensor, check_frames
from service.engines.base import EngineOptions, EngineUnavailable

logger = logging.getLogger(__name__)

MIN_TRT_MAJOR = 10
# TensorRT DataType name -> torch (and numpy, except bfloat16) dtype name
TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}
PRECISION_PREFERENCE = ("fp16", "bf16", "fp32", "int8")  # what precision "auto" takes first


def import_tensorrt() -> Any:
    """TensorRT 10+, or EngineUnavailable saying what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as err:  # OSError: the wheel is there but libnvinfer does not load
        raise EngineUnavailable(
            f"TensorRT cannot be imported ({err}): on a machine with an NVIDIA GPU `pip install 'endostream[gpu]'` "
            f"(TensorRT {MIN_TRT_MAJOR}+); without one use the onnxruntime backend"
        ) from err
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < MIN_TRT_MAJOR:
        raise EngineUnavailable(
            f"TensorRT {tensorrt.__version__} is too old: `pip install 'tensorrt>={MIN_TRT_MAJOR}'`, then rebuild "
            f"the engine with `endostream export trt BUNDLE`"
        )
    return tensorrt


def _import_torch_cuda() -> Any:
    try:
        import torch
    except ImportError as err:
        raise EngineUnavailable(
            "the tensorrt backend allocates its GPU buffers with torch: `pip install torch` (a CUDA build)"
        ) from err
    if not torch.cuda.is_available():
        raise EngineUnavailable(
            f"TensorRT needs a CUDA GPU and torch {torch.__version__} sees none (CUDA build: {torch.version.cuda}): "
            f"check the driver and CUDA_VISIBLE_DEVICES, or use the onnxruntime backend on CPU"
        )
    return torch


def tensor_dtype(trt_dtype: Any) -> str:
    """torch dtype name of a TensorRT `DataType` (by its enum name, e.g. HALF -> "float16")."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    try:
        return TRT_DTYPES[name]
    except KeyError:
        raise EngineUnavailable(
            f"engine tensor dtype {name} is not supported by the service (supported: {sorted(TRT_DTYPES)}): "
            f"rebuild the engine from the bundle's graph with `endostream export trt BUNDLE`"
        ) from None


def entry_mismatch(
    entry: dict[str, Any],
    *,
    model_sha256: str,
    compute_capability: str,
    tensorrt_version: str,
    precision: str,
    max_batch: int,
) -> str | None:
    """Why a manifest engine entry cannot run here, or None when it fits."""
    file = str(entry.get("file", ""))
    if not file.endswith(f".{model_sha256[:16]}.plan"):
        return "built from another graph"
    if str(entry.get("sm")) != compute_capability:
        return f"built for sm{entry.get('sm')}, this GPU is sm{compute_capability}"
    if str(entry.get("tensorrt")) != tensorrt_version:
        return f"built with TensorRT {entry.get('tensorrt')}, installed is {tensorrt_version}"
    if precision != "auto" and entry.get("precision") != precision:
        return f"precision {entry.get('precision')}, asked for {precision}"
    if int(entry.get("max_batch", 0)) < max_batch:
        return f"max batch {entry.get('max_batch')} is below the service's max batch {max_batch}"
    return None


def select_engine(
    entries: Sequence[dict[str, Any]],
    *,
    model_sha256: str,
    compute_capability: str,
    tensorrt_version: str,
    precision: str = "auto",
    max_batch: int = 1,
    bundle: Path | str = "BUNDLE",
) -> dict[str, Any]:
    """The manifest engine entry to load on this machine.

    Among the entries built from this graph for this GPU (`compute_capability`, e.g. "90") and this TensorRT version
    with a profile up to at least `max_batch`, it takes `precision` ("auto": fp16, bf16, fp32, int8 in that order)
    and, on a tie, the smallest max batch (its kernels are tuned closest to the batches the service sends).

    Raises:
        EngineUnavailable: no entry fits; lists why each was rejected and the build command.
    """
    fits, rejected = [], []
    for entry in entries:
        reason = entry_mismatch(
            entry,
            model_sha256=model_sha256,
            compute_capability=compute_capability,
            tensorrt_version=tensorrt_version,
            precision=precision,
            max_batch=max_batch,
        )
        if reason is None:
            fits.append(entry)
        else:
            rejected.append(f"{entry.get('file')}: {reason}")
    if not fits:
        flag = "fp16" if precision == "auto" else precision
        listed = "; ".join(rejected) if rejected else "the manifest lists no engine"
        raise EngineUnavailable(
            f"no TensorRT engine in {bundle} fits this machine (sm{compute_capability}, TensorRT {tensorrt_version}, "
            f"precision {precision}, max batch {max_batch}): {listed}. Build one here with "
            f"`endostream export trt {bundle} --{flag} --max-batch {max_batch}`"
        )

    def rank(entry: dict[str, Any]) -> tuple[int, int]:
        name = entry.get("precision")
        order = PRECISION_PREFERENCE.index(name) if name in PRECISION_PREFERENCE else len(PRECISION_PREFERENCE)
        return order, int(entry["max_batch"])

    return min(fits, key=rank)


def engine_path(bundle: Bundle, entry: dict[str, Any], engine_cache: str | None) -> Path:
    """Where the entry's plan file is: `engine_cache` first, then the bundle folder."""
    folders = ([Path(engine_cache)] if engine_cache else []) + [bundle.path]
    for folder in folders:
        path = folder / str(entry["file"])
        if path.is_file():
            return path
    raise EngineUnavailable(
        f"the manifest lists {entry['file']} but no folder holds it ({[str(f) for f in folders]}): "
        f"rebuild it with `endostream export trt {bundle.path} --{entry.get('precision', 'fp16')} --force`"
    )


@dataclass(frozen=True)
class TensorInfo:
    name: str
    is_input: bool
    dtype: str  # torch dtype name


def io_tensors(trt: Any, engine: Any) -> list[TensorInfo]:
    """Every I/O tensor of a deserialized engine, in engine order."""
    tensors = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        tensors.append(TensorInfo(name, is_input, tensor_dtype(engine.get_tensor_dtype(name))))
    return tensors


class Bindings:
    """Device buffers for one batch size, by tensor name, and the context calls that point TensorRT at them."""

    def __init__(
        self,
        torch: Any,
        context: Any,
        tensors: Sequence[TensorInfo],
        input_name: str,
        input_shape: tuple[int, ...],
        device: Any,
    ) -> None:
        """
        Args:
            torch: the torch module (imported by the caller, so this module imports nothing heavy).
            context: a TensorRT execution context; its input shape is set here to resolve the output shapes.
            tensors: the engine's I/O tensors (`io_tensors`).
            input_name: the bundle's input tensor name (the engine must have exactly this one input).
            input_shape: B x H x W x 3 for this batch size.
            device: where the buffers live (a CUDA device in service; tests use the CPU).
        """
        inputs = [t for t in tensors if t.is_input]
        if [t.name for t in inputs] != [input_name]:
            raise EngineUnavailable(
                f"engine inputs {[t.name for t in inputs]} are not the bundle's single input {input_name!r}: "
                f"the engine was built from another graph; rebuild it with `endostream export trt BUNDLE --force`"
            )
        if inputs[0].dtype != "uint8":
            raise EngineUnavailable(f"engine input {input_name!r} is {inputs[0].dtype}, the bundle feeds uint8 frames")
        self.batch = input_shape[0]
        self.input_name = input_name
        self.buffers: dict[str, Any] = {
            input_name: torch.empty(input_shape, dtype=torch.uint8, device=device),
        }
        self._set_input_shape(context)  # output shapes are only known once the input shape is set
        for tensor in tensors:
            if tensor.is_input:
                continue
            shape = tuple(context.get_tensor_shape(tensor.name))
            if any(dim < 0 for dim in shape):
                raise RuntimeError(f"TensorRT left output {tensor.name!r} unresolved ({shape}) at batch {self.batch}")
            self.buffers[tensor.name] = torch.empty(shape, dtype=getattr(torch, tensor.dtype), device=device)

    @property
    def input(self) -> Any:
        return self.buffers[self.input_name]

    @property
    def outputs(self) -> dict[str, Any]:
        return {name: t for name, t in self.buffers.items() if name != self.input_name}

    def _set_input_shape(self, context: Any) -> None:
        if not context.set_input_shape(self.input_name, tuple(self.input.shape)):
            raise RuntimeError(
                f"TensorRT refused input shape {tuple(self.input.shape)} for {self.input_name!r}: outside the "
                f"engine's optimisation profile; rebuild with a larger `--max-batch`"
            )

    def bind(self, context: Any) -> None:
        """Point `context` at these buffers (needed whenever the context last ran another batch size)."""
        self._set_input_shape(context)
        for name, tensor in self.buffers.items():
            context.set_tensor_address(name, tensor.data_ptr())


class BindingCache:
    """`Bindings` per batch size on one execution context, rebound whenever the batch size changes."""

    def __init__(
        self,
        torch: Any,
        context: Any,
        tensors: Sequence[TensorInfo],
        input_name: str,
        frame_shape: tuple[int, ...],
        device: Any,
    ) -> None:
        self._torch, self._context, self._tensors, self._device = torch, context, tensors, device
        self._input_name = input_name
        self._frame_shape = frame_shape
        self._by_batch: dict[int, Bindings] = {}
        self._bound: int | None = None

    def get(self, batch: int) -> Bindings:
        """The buffers of `batch`, allocated on first use, with the context pointed at them."""
        bindings = self._by_batch.get(batch)
        if bindings is None:
            shape = (batch, *self._frame_shape)
            bindings = Bindings(self._torch, self._context, self._tensors, self._input_name, shape, self._device)
            self._by_batch[batch] = bindings
            self._bound = None  # allocating set this input shape; the addresses are still the previous batch's
        if self._bound != batch:
            bindings.bind(self._context)
            self._bound = batch
        return bindings

    def clear(self) -> None:
        self._by_batch.clear()
        self._bound = None


class TensorRTEngine:
    """An `Engine` on a serialized TensorRT engine listed in the bundle manifest (CUDA only)."""

    backend = "tensorrt"

    def __init__(self, bundle: Bundle, options: EngineOptions | None = None) -> None:
        """
        Args:
            bundle: a loaded bundle whose manifest lists engines (`endostream export trt BUNDLE`).
            options: precision ("auto" or the engine precision to load), max_batch (the engine's profile must reach
                it), cuda_graphs (capture each batch size once), engine_cache (another folder holding plan files).

        Raises:
            EngineUnavailable: device cpu, TensorRT or a CUDA GPU missing, or no engine built for this machine.
        """
        options = options or EngineOptions()
        if options.device == "cpu":
            raise EngineUnavailable("TensorRT runs on CUDA GPUs only: use the onnxruntime or torch backend on CPU")
        trt = import_tensorrt()
        torch = _import_torch_cuda()
        major, minor = torch.cuda.get_device_capability()
        entry = select_engine(
            bundle.manifest.engines,
            model_sha256=bundle.manifest.model_sha256,
            compute_capability=f"{major}{minor}",
            tensorrt_version=str(trt.__version__),
            precision=options.precision,
            max_batch=options.max_batch,
            bundle=bundle.path,
        )
        path = engine_path(bundle, entry, options.engine_cache)
        self._torch = torch
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise EngineUnavailable(
                f"TensorRT could not deserialize {path} (see its log above): rebuild it with "
                f"`endostream export trt {bundle.path} --{entry['precision']} --force`"
            )
        # The default (static) allocation strategy sizes activation memory for the largest profile shape, so
        # switching batch sizes never reallocates under a captured graph.
        self._context = self._engine.create_execution_context()
        self._tensors = io_tensors(trt, self._engine)
        self._bundle = bundle
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self._device)
        spec = bundle.manifest.input
        self._bindings = BindingCache(
            torch, self._context, self._tensors, spec.name, (spec.height, spec.width, 3), self._device
        )
        self._graphs: dict[int, Any] = {}
        self._use_graphs = options.cuda_graphs
        self.max_batch = int(entry["max_batch"])
        self.device = str(self._device)
        self.precision = str(entry["precision"])
        self.output_names = tuple(t.name for t in self._tensors if not t.is_input)
        self.engine_file = path
        logger.info("TensorRT %s: %s on %s (%s)", trt.__version__, path.name, self.device, self.precision)

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def _graph(self, batch: int) -> Any:
        """The CUDA graph of `batch` (bound and current), captured on first use; None when graphs are off."""
        if not self._use_graphs:
            return None
        if batch not in self._graphs:
            torch = self._torch
            self._execute()  # one plain run first: TensorRT finishes shape-dependent setup outside the capture
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: only this thread's CUDA calls are checked against the capture
                with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                    self._execute()
            except RuntimeError as err:
                logger.warning("CUDA graph capture failed at batch %d (%s); running without graphs", batch, err)
                self._use_graphs = False
                self._graphs.clear()
                return None
            self._graphs[batch] = graph
            logger.info("captured a CUDA graph for batch %d", batch)
        return self._graphs[batch]

    def run(self, frames: Any) -> dict[str, np.ndarray]:
        """`frames`: a numpy batch, or a uint8 tensor batch already on this GPU (GPU-decoded frames: no host copy)."""
        torch = self._torch
        if isinstance(frames, np.ndarray):
            source = torch.from_numpy(check_frames(frames, self._bundle))
        else:
            source = check_frame_tensor(frames, self._bundle)
        batch = source.shape[0]
        if batch > self.max_batch:
            raise ValueError(
                f"batch {batch} is above the engine's max batch {self.max_batch}: send smaller batches or build an "
                f"engine with `endostream export trt {self._bundle.path} --max-batch {batch}`"
            )
        bindings = self._bindings.get(batch)
        with torch.cuda.stream(self._stream):
            bindings.input.copy_(source)
            graph = self._graph(batch)
            if graph is not None:
                graph.replay()
            else:
                self._execute()
            # .cpu() on this stream waits for the run; numpy has no bfloat16
            return {
                name: (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()
                for name, t in bindings.outputs.items()
            }

    def close(self) -> None:
        self._graphs.clear()
        self._bindings.clear()
        self._context = None
        self._engine = None
        self._runtime = None
        self._torch.cuda.empty_cache()
