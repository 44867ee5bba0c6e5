"""A test bundle with a temporal head: STANDS IN FOR THE REAL EXPORTER of issue 20 until the model side lands.

`add_ema_head` copies a bundle and adds a head that follows the temporal-head contract exactly (README "Temporal
activity in results"): `temporal_head.onnx` with inputs `features` [N, K] and `state` [N, K + 1], outputs `probs`
[N, K] and `state_out` [N, K + 1], and a `temporal` block in the manifest. The head is an exponential moving
average over the per-frame `activity_probs`, written directly with onnx.helper (the graph is four operators):

    state = [count, ema_1 .. ema_K]           all zeros = fresh
    w     = 1 - (1 - alpha) * min(count, 1)    (1 on the first step: the answer is the frame's own probabilities)
    ema'  = ema + w * (features - ema)
    probs = ema',  state_out = [count + 1, ema']

`ema_reference` computes the same thing in numpy, so tests can predict every answer the service must give.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.bundle import sha256_file

HEAD_FILE = "temporal_head.onnx"


def ema_head(classes: int, alpha: float, opset: int = 18) -> onnx.ModelProto:
    """The EMA head as an ONNX model over `classes` probabilities."""
    k = classes
    consts = {
        "zero": np.array([0], np.int64),
        "one_i": np.array([1], np.int64),
        "end": np.array([k + 1], np.int64),
        "axis": np.array([1], np.int64),
        "one": np.array(1.0, np.float32),
        "decay": np.array(1.0 - alpha, np.float32),
    }
    nodes = [
        helper.make_node("Slice", ["state", "zero", "one_i", "axis"], ["count"]),
        helper.make_node("Slice", ["state", "one_i", "end", "axis"], ["ema"]),
        helper.make_node("Min", ["count", "one"], ["seen"]),
        helper.make_node("Mul", ["seen", "decay"], ["keep"]),
        helper.make_node("Sub", ["one", "keep"], ["w"]),
        helper.make_node("Sub", ["features", "ema"], ["delta"]),
        helper.make_node("Mul", ["w", "delta"], ["move"]),
        helper.make_node("Add", ["ema", "move"], ["probs"]),
        helper.make_node("Add", ["count", "one"], ["next_count"]),
        helper.make_node("Concat", ["next_count", "probs"], ["state_out"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "ema_temporal_head",
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", k]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, ["N", k + 1]),
        ],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", k]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["N", k + 1]),
        ],
        initializer=[numpy_helper.from_array(v, name) for name, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def add_ema_head(
    bundle: Path,
    out: Path,
    *,
    alpha: float = 0.5,
    frame_interval_s: float = 0.1,
    receptive_field_frames: int = 8,
    hash_in_files: bool = False,
) -> Path:
    """Copy `bundle` to `out` with an EMA temporal head on its classification task; returns `out`.

    Args:
        hash_in_files: list the head's sha256 in the manifest's top-level `files` mapping instead of
            `temporal.graph_sha256` (the service accepts either).
    """
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    task = next(t for t in manifest["tasks"] if t["kind"] == "classification")
    k = len(task["classes"])
    onnx.save(ema_head(k, alpha, manifest.get("opset", 18)), out / HEAD_FILE)
    digest = sha256_file(out / HEAD_FILE)
    temporal = {
        "task": task["name"],
        "method": "ema",
        "graph": HEAD_FILE,
        "input_output": task["output"],
        "input_dim": k,
        "state_shape": [k + 1],
        "frame_interval_s": frame_interval_s,
        "receptive_field_frames": receptive_field_frames,
        "parity_max_abs_diff": 0.0,
    }
    if hash_in_files:
        manifest["files"] = {HEAD_FILE: digest}
    else:
        temporal["graph_sha256"] = digest
    manifest["temporal"] = temporal
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def ema_reference(inputs: list[np.ndarray], alpha: float) -> np.ndarray:
    """The EMA head's answer after stepping on `inputs` in order, from a fresh state (numpy, float64)."""
    ema = np.asarray(inputs[0], np.float64)
    for x in inputs[1:]:
        ema = ema + alpha * (np.asarray(x, np.float64) - ema)
    return ema
