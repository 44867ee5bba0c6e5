"""Graph rewrites for ONNX Runtime: exact on hand-built GELU and patch unfold/fold graphs, and applied to exports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.graph_passes import block_transposes_to_depth_ops, reorder_gelu_for_fusion
from export.manifest import MODEL_FILE


def _gelu_graph(outer_operand: str = "x") -> onnx.ModelProto:
    """torch.onnx's exact GELU: x * (0.5 * (1 + erf(x / sqrt 2))), on a (2, 8) float input."""
    constants = [
        numpy_helper.from_array(np.array(math.sqrt(2.0), np.float32), "root2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("Div", ["x", "root2"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "half"], ["halved"]),
        helper.make_node("Mul", [outer_operand, "halved"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 8]) for n in sorted({"x", outer_operand})]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    graph = helper.make_graph(nodes, "gelu", inputs, [output], initializer=constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _optimised_ops(path: Path, tmp_path: Path) -> list[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]


def test_gelu_is_reordered_exactly_and_then_fused_by_onnxruntime(tmp_path: Path):
    model = _gelu_graph()
    x = np.random.default_rng(0).normal(0, 2, (2, 8)).astype(np.float32)
    before = _run(model, {"x": x}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert reorder_gelu_for_fusion(model) == 1
    onnx.checker.check_model(model, full_check=True)
    after = _run(model, {"x": x}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-7)
    onnx.save(model, str(tmp_path / "gelu.onnx"))
    assert _optimised_ops(tmp_path / "gelu.onnx", tmp_path) == ["Gelu"]


def test_a_product_with_another_tensor_is_not_gelu_and_stays():
    model = _gelu_graph(outer_operand="gate")
    assert reorder_gelu_for_fusion(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Div", "Erf", "Add", "Mul", "Mul"]


def test_every_gelu_of_an_exported_bundle_runs_fused(endoarss_bundle: Path, tmp_path: Path):
    manifest = json.loads((endoarss_bundle / "manifest.json").read_text())
    assert manifest["checks"]["graph_passes"]["gelu_reordered_for_fusion"] == 2  # one MLP per block, 2 blocks
    ops = _optimised_ops(endoarss_bundle / MODEL_FILE, tmp_path)
    assert "Erf" not in ops and ops.count("BiasGelu") + ops.count("Gelu") == 2


@pytest.mark.parametrize("last", ["Erf", "Add", "Mul"])
def test_a_partial_pattern_is_left_alone(last: str):
    model = _gelu_graph()
    ops = [n.op_type for n in model.graph.node]
    del model.graph.node[ops.index(last) + 1 :]
    model.graph.output[0].name = model.graph.node[-1].output[0]
    assert reorder_gelu_for_fusion(model) == 0


def _block_graph(perm: list[int], view: list[int | None], out: list[int], source: list[int]) -> onnx.ModelProto:
    """x -> Reshape(view) -> Transpose(perm) -> Reshape(out) with a dynamic batch. A None batch in `view` is computed
    from the input's shape as torch.onnx writes it (Shape -> Slice -> Concat); SMA's fold views with -1 instead."""
    constants = [
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([1], np.int64), "stop"),
        numpy_helper.from_array(np.array(view[1:], np.int64), "view_tail"),
        numpy_helper.from_array(np.array([-1 if d is None else d for d in view], np.int64), "view_const"),
        numpy_helper.from_array(np.array(out, np.int64), "out_shape"),
    ]
    view_shape = [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Slice", ["x_shape", "start", "stop"], ["batch"]),
        helper.make_node("Concat", ["batch", "view_tail"], ["view_shape"], axis=0),
    ]
    nodes = [
        *(view_shape if view[0] is None else []),
        helper.make_node("Reshape", ["x", "view_shape" if view[0] is None else "view_const"], ["blocks"]),
        helper.make_node("Transpose", ["blocks"], ["moved"], perm=perm),
        helper.make_node("Reshape", ["moved", "out_shape"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *source[1:]])]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", *out[1:]])
    graph = helper.make_graph(nodes, "blocks", inputs, [output], initializer=constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


# SMA's unfold (B C H W -> (B P) C H/b W/b) and fold (the inverse), with C = 3 channels, 2x2 blocks on a 4 x 6 map.
_UNFOLD = ([0, 3, 5, 1, 2, 4], [None, 3, 2, 2, 3, 2], [-1, 3, 2, 3], [-1, 3, 4, 6])
_FOLD = ([0, 3, 4, 1, 5, 2], [-1, 2, 2, 3, 2, 3], [-1, 3, 4, 6], [-1, 3, 2, 3])


@pytest.mark.parametrize(("case", "depth_op"), [(_UNFOLD, "SpaceToDepth"), (_FOLD, "DepthToSpace")])
def test_block_transposes_become_depth_ops_with_identical_results(case: tuple, depth_op: str):
    model = _block_graph(*case)
    source = case[3]
    rng = np.random.default_rng(1)
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    frames = {
        batch: rng.normal(size=(batch * (4 if depth_op == "DepthToSpace" else 1), *source[1:])) for batch in (1, 3)
    }
    before = {b: _run(model, {"x": x.astype(np.float32)}, off) for b, x in frames.items()}
    assert block_transposes_to_depth_ops(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert depth_op in ops and "Transpose" not in ops
    assert not {"Shape", "Slice", "Concat"} & set(ops)  # the replaced view's shape arithmetic is gone with it
    for batch, x in frames.items():
        np.testing.assert_array_equal(_run(model, {"x": x.astype(np.float32)}, off), before[batch])


def test_other_permutations_and_non_square_blocks_stay():
    other = _block_graph([0, 3, 5, 1, 4, 2], *_UNFOLD[1:])
    assert block_transposes_to_depth_ops(other) == 0
    non_square = _block_graph(_UNFOLD[0], [None, 3, 2, 2, 2, 3], [-1, 3, 2, 2], [-1, 3, 4, 6])
    assert block_transposes_to_depth_ops(non_square) == 0
    assert "Transpose" in [n.op_type for n in non_square.graph.node]


def test_sma_unfold_and_fold_of_an_export_run_as_depth_ops(endoarss_bundle: Path):
    manifest = json.loads((endoarss_bundle / "manifest.json").read_text())
    assert manifest["checks"]["graph_passes"]["block_transposes_to_depth_ops"] == 2
    model = onnx.load(str(endoarss_bundle / MODEL_FILE))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("SpaceToDepth") == 1 and ops.count("DepthToSpace") == 1
    ranks = {info.name: len(info.type.tensor_type.shape.dim) for info in model.graph.value_info}
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and ranks.get(n.input[0]) == 6]
