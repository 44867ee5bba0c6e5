"""Checks every exported graph passes: ONNX validity, weight content, and ONNX Runtime vs PyTorch parity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

ADAPTER_MARKERS = ("lora_", "tesla", "adapter")
PROB_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-4  # relative: max |ONNX - PyTorch| / max |PyTorch| over a features output
MASK_AGREEMENT = 0.999


def check_graph(path: Path) -> onnx.ModelProto:
    """`onnx.checker` (full check, including shape inference) and strict shape inference; returns the model."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    return model


def initializer_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Initializer name -> number of elements (every weight the graph carries)."""
    return {init.name: int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer}


def adapter_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers whose names mark them as adapter factors (must be none: factors are folded on export)."""
    return [name for name in initializer_sizes(model) if any(m in name.lower() for m in ADAPTER_MARKERS)]


@dataclass
class ParityReport:
    """ONNX Runtime against the PyTorch wrapper on the same frames, per batch size tried."""

    batches: list[int]
    max_prob_diff: float
    mask_agreement: float
    passed: bool
    max_feature_rel_diff: float | None = None  # only when the graph has `<task>_features` outputs

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        if body["max_feature_rel_diff"] is None:  # graphs without features outputs keep their old record
            del body["max_feature_rel_diff"]
        return body


def onnxruntime_session(path: Path, threads: int | None = None, *, spinning: bool = True) -> Any:
    """A CPU ONNX Runtime session; `spinning=False` stops its worker threads spin-waiting for work between runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(
    graph: nn.Module,
    path: Path,
    frames: np.ndarray,
    kinds: Sequence[str],
    *,
    batches: Sequence[int] = (1, 8),
) -> ParityReport:
    """Run `frames` (N H W 3 uint8) through the wrapper and the ONNX graph at each batch size and compare.

    Args:
        graph: the `BundleGraph` that was exported.
        path: the exported `model.onnx`.
        frames: test frames; batches of each size are cut from them (repeating frames when N is smaller).
        kinds: per graph output, "probabilities", "class_map", "logits" (not compared: the results they feed are)
            or "features" (compared relative to the largest PyTorch value).
    """
    session = onnxruntime_session(path)
    prob_diff, agree, total = 0.0, 0, 0
    feature_diff: float | None = None
    for batch in batches:
        index = np.arange(batch) % len(frames)
        x = np.ascontiguousarray(frames[index])
        ours = session.run(None, {session.get_inputs()[0].name: x})
        with torch.no_grad():
            reference = [t.numpy() for t in graph(torch.from_numpy(x))]
        for kind, got, want in zip(kinds, ours, reference, strict=True):
            if got.shape != want.shape:
                raise AssertionError(f"ONNX output shape {got.shape} != PyTorch {want.shape} at batch {batch}")
            if kind == "class_map":
                agree += int((got == want).sum())
                total += got.size
            elif kind == "probabilities":
                prob_diff = max(prob_diff, float(np.abs(got - want).max()))
            elif kind == "features":
                rel = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-6))
                feature_diff = max(feature_diff or 0.0, rel)
    agreement = agree / total if total else 1.0
    passed = prob_diff <= PROB_TOLERANCE and agreement >= MASK_AGREEMENT
    passed = passed and (feature_diff is None or feature_diff <= FEATURE_TOLERANCE)
    return ParityReport(list(batches), prob_diff, agreement, passed, feature_diff)
