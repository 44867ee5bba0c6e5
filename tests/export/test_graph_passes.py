"""Graph rewrites for ONNX Runtime's fusions: exact on a hand-built GELU, and every GELU of an export is fused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.graph_passes import reorder_gelu_for_fusion
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
