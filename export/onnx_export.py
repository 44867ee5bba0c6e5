"""`endostream export onnx`: checkpoint -> bundle (one ONNX graph for all tasks + manifest), checked before it is kept.

Steps: load the checkpoint; fold every LoRA/TESLA factor into per-task weights (unless the checkpoint is merged
already); pin the position grid to the export size; export the `BundleGraph` wrapper with a dynamic batch axis in
export mode (explicit attention instead of fused SDPA); run `onnx.checker` and shape inference; compare ONNX Runtime
with PyTorch on generated endoscopy frames at batch 1 and 8; write `manifest.json`. A graph that fails a check is not
left in the bundle.

With `torch_program` the same wrapper is also saved as a `torch.export` program (`model.pt2`) for the service's torch
backend. It keeps fused attention (SDPA: flash / memory-efficient kernels on a GPU), is checked against the ONNX graph
with the same tolerances, and is recorded in the manifest's `checks["torch_program"]` with its sha256.

With `temporal_head` (a head saved by `endostream train-temporal`) the graph also outputs the classification task's
pre-logit features (`<task>_features`, checked for parity like the rest), the head is exported next to it as
`temporal_head.onnx` (export/temporal.py: one step, explicit state, step-by-step parity with PyTorch) and the
manifest gains the task's `features_output` and the `temporal` section.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import torch

from export.checks import (
    MASK_AGREEMENT,
    PROB_TOLERANCE,
    adapter_initializers,
    check_graph,
    check_parity,
    initializer_sizes,
)
from export.exporter_logs import quiet_exporter_logs
from export.graph import INPUT_NAME, BundleGraph, GraphOutput, prepare_for_export
from export.graph_passes import block_transposes_to_depth_ops, reorder_gelu_for_fusion
from export.manifest import MODEL_FILE, InputSpec, Manifest, TaskEntry, sha256_file, write_manifest
from export.temporal import HEAD_FILE, export_head, manifest_section
from training.checkpoint import WEIGHTS_FILE, load_checkpoint
from training.data.synth import render_image
from training.layers.export_mode import exportable

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization is a standard op from 17 on
PARITY_FRAMES = 8
PARITY_SEED = 20261123
_BATCH_DIM = torch.export.Dim("batch", min=1, max=1024)
TORCH_PROGRAM_FILE = "model.pt2"  # the service's bundle reader looks for this name


@dataclass
class ExportResult:
    bundle: Path
    manifest: Manifest
    seconds: float


def generated_frames(count: int, height: int, width: int, seed: int = PARITY_SEED) -> np.ndarray:
    """`count` synthetic endoscopy frames (N H W 3 uint8 RGB) resized to the model size, as the service would."""
    frames = [render_image(seed, i, 256, 256).image for i in range(count)]
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])


def _exporter_version() -> str:
    try:
        return metadata.version("endostream")
    except metadata.PackageNotFoundError:
        return "unknown"


def export_onnx(
    checkpoint: Path,
    out: Path,
    *,
    height: int | None = None,
    width: int | None = None,
    opset: int = DEFAULT_OPSET,
    logits: bool = False,
    tasks: Sequence[str] | None = None,
    overwrite: bool = False,
    torch_program: bool = False,
    temporal_head: Path | None = None,
    features: bool | None = None,
) -> ExportResult:
    """Export `checkpoint` into the bundle folder `out`.

    Args:
        checkpoint: a checkpoint directory (`RUN/best` or `RUN/best-merged`).
        out: bundle folder; must not hold a bundle unless `overwrite`.
        height: model input height (default: the training `model.image_size`); a multiple of the patch size.
        width: model input width (default: the training size).
        opset: ONNX opset (at least 17).
        logits: add `<task>_logits` outputs.
        tasks: export only these tasks (default: all); a graph per task is what the fused graph is compared with.
        overwrite: replace an existing bundle in `out`.
        torch_program: also write `model.pt2` (`torch.export` program of the same wrapper, dynamic batch).
        temporal_head: a temporal head directory (`RUN/tcn`, `RUN/ema`, `RUN/hmm` of `endostream train-temporal`)
            to export as `temporal_head.onnx` and describe in the manifest.
        features: add `<task>_features` (pre-logit features) per classification task; default: with a temporal
            head that reads them.

    Raises:
        ValueError: bad size or opset, an existing bundle, or a graph that fails a check (nothing is kept then).
    """
    started = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: use --opset {MIN_OPSET} or newer (default {DEFAULT_OPSET})")
    if (out / MODEL_FILE).exists() and not overwrite:
        raise ValueError(f"{out} already holds a bundle; pass --overwrite to replace it or choose another --out")
    ckpt = load_checkpoint(checkpoint)
    size = ckpt.config.model.image_size
    height, width = height or size[0], width or size[1]
    patch = ckpt.model.backbone.patch_size
    if height % patch or width % patch:
        raise ValueError(
            f"--height/--width {height}x{width} must be multiples of the patch size {patch}: "
            f"try {height // patch * patch}x{width // patch * patch}"
        )
    for task in ckpt.labels["tasks"]:
        if task["kind"] == "segmentation" and len(task["classes"]) > 256:
            raise ValueError(f"task {task['name']!r} has {len(task['classes'])} classes; the uint8 map holds 256")
    head = _load_temporal_head(temporal_head, ckpt.labels["tasks"], tasks) if temporal_head else None
    if features is None:  # by default only a head that reads them gets the pre-logit features output
        features = head is not None and head[0].input_kind == "features"
    model = prepare_for_export(ckpt.model, height, width)
    graph = BundleGraph(model, tasks=tasks, logits=logits, features=features).eval()
    outputs = graph.outputs
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    program_path = out / TORCH_PROGRAM_FILE
    program_path.unlink(missing_ok=True)  # a program left from an earlier export would not match the new graph
    head_path = out / HEAD_FILE
    head_path.unlink(missing_ok=True)  # a head left from an earlier export does not belong to the new bundle
    sample = torch.from_numpy(generated_frames(2, height, width))
    logger.info("exporting %s at %dx%d (opset %d) to %s", checkpoint, height, width, opset, path)
    try:
        with exportable(), torch.no_grad(), quiet_exporter_logs():
            torch.onnx.export(
                graph,
                (sample,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[o.name for o in outputs],
                dynamic_shapes={"frames": {0: _BATCH_DIM}},
                opset_version=opset,
                external_data=False,
                dynamo=True,
                optimize=False,
            )
        passes = _shape_for_onnxruntime(path)
        proto = check_graph(path)
        leftovers = adapter_initializers(proto)
        if leftovers:
            raise ValueError(f"adapter factors left in the graph: {leftovers[:5]}")
        frames = generated_frames(PARITY_FRAMES, height, width)
        parity = check_parity(graph, path, frames, [o.kind for o in outputs])
        if not parity.passed:
            raise ValueError(
                f"ONNX Runtime disagrees with PyTorch: max probability difference {parity.max_prob_diff:.2e} "
                f"(limit {PROB_TOLERANCE:g}), mask agreement {parity.mask_agreement:.5f} (limit {MASK_AGREEMENT:g})"
            )
        program = _export_torch_program(graph, sample, program_path, frames, outputs) if torch_program else None
        temporal = _export_temporal(head, head_path, graph, frames, opset) if head else None
    except Exception:
        path.unlink(missing_ok=True)
        program_path.unlink(missing_ok=True)
        head_path.unlink(missing_ok=True)
        raise
    logger.info(
        "checks passed: onnx.checker (full), shape inference, parity at batch %s (max prob diff %.1e, masks %.4f)",
        parity.batches,
        parity.max_prob_diff,
        parity.mask_agreement,
    )
    manifest = Manifest(
        family=ckpt.config.model.family,
        name=ckpt.config.name,
        tasks=_task_entries([t for t in ckpt.labels["tasks"] if t["name"] in graph.tasks], outputs),
        input=InputSpec(INPUT_NAME, "NHWC", "uint8", height, width, "RGB"),
        precision="fp32",
        opset=opset,
        model_file=MODEL_FILE,
        model_sha256=sha256_file(path),
        checkpoint_sha256=sha256_file(checkpoint / WEIGHTS_FILE),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        exporter_version=_exporter_version(),
        checks={
            "onnx_checker": "full",
            "parity": parity.to_dict(),
            "weights": sum(initializer_sizes(proto).values()),
            "graph_passes": passes,
            "source_checkpoint": str(checkpoint),
            "source_merged": ckpt.merged,
            **({"torch_program": program} if program else {}),
        },
        temporal=temporal,
    )
    write_manifest(out, manifest)
    seconds = time.perf_counter() - started
    logger.info("bundle written to %s in %.1f s", out, seconds)
    return ExportResult(out, manifest, seconds)


def _shape_for_onnxruntime(path: Path) -> dict[str, int]:
    """Apply the exact graph rewrites of `export.graph_passes` to the saved graph; how many sites each changed."""
    model = onnx.load(str(path))
    passes = {
        "gelu_reordered_for_fusion": reorder_gelu_for_fusion(model),
        "block_transposes_to_depth_ops": block_transposes_to_depth_ops(model),
    }
    if any(passes.values()):
        onnx.save(model, str(path))
    logger.info("graph passes: %s", passes)
    return passes


def _export_torch_program(
    graph: BundleGraph, sample: torch.Tensor, path: Path, frames: np.ndarray, outputs: list[GraphOutput]
) -> dict[str, Any]:
    """Save `graph` as a `torch.export` program at `path`, check the reloaded program against the ONNX graph.

    Exported outside `exportable()`: the program keeps fused SDPA attention, which the ONNX graph cannot carry but
    a GPU runs fastest. Returns the manifest record (file, sha256, output names, torch version, parity).
    """
    with torch.no_grad():
        program = torch.export.export(graph, (sample,), dynamic_shapes={"frames": {0: _BATCH_DIM}})
    torch.export.save(program, path)
    reloaded = torch.export.load(path).module()  # check what the service will load, not the in-memory program
    parity = check_parity(reloaded, path.with_name(MODEL_FILE), frames, [o.kind for o in outputs])
    if not parity.passed:
        raise ValueError(
            f"the torch program disagrees with the ONNX graph: max probability difference {parity.max_prob_diff:.2e} "
            f"(limit {PROB_TOLERANCE:g}), mask agreement {parity.mask_agreement:.5f} (limit {MASK_AGREEMENT:g})"
        )
    logger.info("torch program written to %s (parity at batch %s)", path, parity.batches)
    # pt2 archives load reliably only into the torch version that wrote them: the service warns on a mismatch
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "outputs": [o.name for o in outputs],  # the program returns a tuple: these name it, as in the ONNX graph
        "torch": torch.__version__,
        "parity": parity.to_dict(),
    }


def _task_entries(tasks: list[dict], outputs: list[GraphOutput]) -> list[TaskEntry]:
    entries = []
    for task in tasks:
        result = next(o.name for o in outputs if o.task == task["name"] and o.kind not in ("logits", "features"))
        raw = next((o.name for o in outputs if o.task == task["name"] and o.kind == "logits"), None)
        feats = next((o.name for o in outputs if o.task == task["name"] and o.kind == "features"), None)
        colors = task.get("colors")
        entries.append(
            TaskEntry(
                name=task["name"],
                kind=task["kind"],
                classes=list(task["classes"]),
                output=result,
                colors=[list(c) for c in colors] if colors else None,
                logits_output=raw,
                features_output=feats,
            )
        )
    return entries


def _load_temporal_head(path: Path, label_tasks: list[dict], tasks: Sequence[str] | None) -> tuple[Any, dict]:
    """The head saved in `path` and its head.json, checked against the checkpoint's classes and `--tasks`."""
    from training.temporal.heads import load_head

    head, body = load_head(Path(path))
    task = next((t for t in label_tasks if t["name"] == body.get("task")), None)
    if task is None or task["kind"] != "classification":
        raise ValueError(f"{path}: the head follows task {body.get('task')!r}, not a classification task here")
    if list(task["classes"]) != list(body.get("classes", [])):
        raise ValueError(
            f"{path}: the head's classes {body.get('classes')} differ from the checkpoint's {task['classes']}"
        )
    if tasks is not None and task["name"] not in tasks:
        raise ValueError(f"--tasks {list(tasks)} leaves out {task['name']!r}, which the temporal head follows")
    return head, body


def _export_temporal(
    loaded: tuple[Any, dict], path: Path, graph: BundleGraph, frames: np.ndarray, opset: int
) -> dict[str, Any]:
    """Export the temporal head next to the graph; its manifest section (with the graph's sha256)."""
    head, body = loaded
    task = body["task"]
    source = f"{task}_features" if head.input_kind == "features" else f"{task}_probs"
    names = [o.name for o in graph.outputs]
    if source not in names:
        raise ValueError(f"the {head.method} head reads {source!r}, which the graph does not output ({names})")
    with torch.no_grad():
        width = graph(torch.from_numpy(frames[:1]))[names.index(source)].shape[1]
    if width != head.input_dim:
        raise ValueError(f"the {head.method} head reads {head.input_dim} values per frame; {source} has {width}")
    result = export_head(head, path, opset)
    section = manifest_section(head, task, source, float(body["frame_interval_s"]), result.parity_max_abs_diff)
    return {**section, "graph_sha256": sha256_file(path)}
