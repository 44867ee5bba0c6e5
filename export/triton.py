"""`endostream export triton`: a bundle as a Triton Inference Server model repository.

Layout written under REPO (Triton's model repository convention):

    REPO/<name>/config.pbtxt          inputs/outputs read from the ONNX graph itself, dynamic batching, instances
    REPO/<name>/<task>_labels.txt     class names, one per line, for each classification output
    REPO/<name>/manifest.json         the bundle manifest (provenance; Triton ignores it)
    REPO/<name>/1/model.onnx          the bundle graph

The graph keeps its uint8 NHWC input and its finished outputs, so a Triton client sends the resized frame and gets the
probabilities and the class map, exactly as the endostream service does.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from export.manifest import MANIFEST_FILE, Manifest, read_manifest

# ONNX element type -> Triton data type (model_config.proto DataType).
TRITON_TYPES: dict[int, str] = {
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]  # without the batch axis


def graph_tensors(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph with a leading dynamic batch axis, in Triton terms."""
    graph = onnx.load(str(path), load_external_data=False).graph
    specs: tuple[list[TensorSpec], list[TensorSpec]] = ([], [])
    for side, values in zip(specs, (graph.input, graph.output), strict=True):
        for value in values:
            tensor = value.type.tensor_type
            if tensor.elem_type not in TRITON_TYPES:
                raise ValueError(f"{path}: {value.name} has ONNX type {tensor.elem_type}, which Triton cannot serve")
            dims = tensor.shape.dim
            if not dims or dims[0].dim_value:
                raise ValueError(f"{path}: {value.name} has no dynamic batch axis; export the bundle again")
            rest = tuple(d.dim_value if d.dim_value else -1 for d in dims[1:])
            side.append(TensorSpec(value.name, TRITON_TYPES[tensor.elem_type], rest))
    return specs


def model_name(manifest: Manifest) -> str:
    """A Triton-safe model name from the bundle: `<family>_<name>`, other characters replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{manifest.family}_{manifest.name}")


def render_config(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    labels: dict[str, str],
    *,
    max_batch: int,
    preferred_batches: list[int],
    max_queue_delay_us: int,
    instances: int,
    kind: str,
) -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig)."""

    def tensor(spec: TensorSpec, label: str | None = None) -> str:
        dims = ", ".join(str(d) for d in spec.dims)
        extra = f'\n    label_filename: "{label}"' if label else ""
        return f'  {{\n    name: "{spec.name}"\n    data_type: {spec.data_type}\n    dims: [ {dims} ]{extra}\n  }}'

    preferred = ", ".join(str(b) for b in preferred_batches)
    return "\n".join(
        [
            f'name: "{name}"',
            'platform: "onnxruntime_onnx"',
            f"max_batch_size: {max_batch}",
            "input [\n" + ",\n".join(tensor(s) for s in inputs) + "\n]",
            "output [\n" + ",\n".join(tensor(s, labels.get(s.name)) for s in outputs) + "\n]",
            "dynamic_batching {\n"
            f"  preferred_batch_size: [ {preferred} ]\n"
            f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
            "}",
            f"instance_group [\n  {{\n    count: {instances}\n    kind: {KINDS[kind]}\n  }}\n]",
            "",
        ]
    )


def write_triton_repository(
    bundle: Path,
    repo: Path,
    *,
    name: str | None = None,
    max_batch: int = 8,
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    kind: str = "gpu",
    overwrite: bool = False,
) -> Path:
    """Write the bundle as model `name` (default `<family>_<name>`) into the repository `repo`; returns its folder.

    Args:
        max_batch: Triton's max_batch_size (the graph accepts any batch; this caps what Triton forms).
        max_queue_delay_us: how long Triton waits to fill a batch.
        instances: model instances per device.
        kind: "gpu" or "cpu" instances.
        overwrite: replace an existing model folder of the same name.
    """
    if kind not in KINDS:
        raise ValueError(f"instance kind {kind!r} is not one of {sorted(KINDS)}")
    if max_batch < 1 or instances < 1 or max_queue_delay_us < 0:
        raise ValueError(
            f"max_batch ({max_batch}) and instances ({instances}) must be at least 1, "
            f"max_queue_delay_us ({max_queue_delay_us}) non-negative"
        )
    bundle, repo = Path(bundle), Path(repo)
    manifest = read_manifest(bundle)
    name = name or model_name(manifest)
    folder = repo / name
    if folder.exists():
        if not overwrite:
            raise ValueError(f"{folder} exists; pass --overwrite to replace it or choose another --name")
        shutil.rmtree(folder)
    inputs, outputs = graph_tensors(bundle / manifest.model_file)
    (folder / "1").mkdir(parents=True)
    shutil.copy2(bundle / manifest.model_file, folder / "1" / "model.onnx")
    shutil.copy2(bundle / MANIFEST_FILE, folder / MANIFEST_FILE)
    labels: dict[str, str] = {}
    for task in manifest.tasks:
        if task.kind == "classification":
            filename = f"{task.name}_labels.txt"
            (folder / filename).write_text("\n".join(task.classes) + "\n")
            labels[task.output] = filename
    preferred = sorted({b for b in (max_batch // 2, max_batch) if b >= 1})
    config = render_config(
        name,
        inputs,
        outputs,
        labels,
        max_batch=max_batch,
        preferred_batches=preferred,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        kind=kind,
    )
    (folder / "config.pbtxt").write_text(config)
    return folder
