"""`endostream export quantize`: QDQ INT8 graph from calibration frames, scored against fp32 into the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from endostream.cli import main
from export.checks import onnxruntime_session
from export.manifest import MODEL_FILE, read_manifest
from export.onnx_export import generated_frames
from export.quantize import calibration_frames, quantize_bundle
from tests.checkpoints import SIZE

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def int8_bundle(endoarss_bundle: Path, labelled_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8")
    quantize_bundle(endoarss_bundle, labelled_data / "train", out=out, count=16, data=labelled_data, progress=False)
    return out


def _int8_weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2}


def _dequantized_inputs(model: onnx.ModelProto, op_type: str) -> list[list[bool]]:
    """For each `op_type` node, whether each of its first two inputs comes out of a DequantizeLinear."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [[name in dequantized for name in n.input[:2]] for n in model.graph.node if n.op_type == op_type]


def test_int8_graph_is_qdq_on_matmul_inputs_with_int8_weights(int8_bundle: Path):
    model = onnx.load(str(int8_bundle / MODEL_FILE))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    assert len(_int8_weights(model)) == 8  # qkv / proj / fc1 / fc2 in each of the 2 blocks
    assert all(all(pair) for pair in _dequantized_inputs(model, "MatMul"))
    convolutions = _dequantized_inputs(model, "Conv")
    assert convolutions and not any(any(pair) for pair in convolutions)  # cpu target: float convolutions
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_stacked_task_weights_are_per_tensor_and_the_rest_per_channel(int8_bundle: Path):
    model = onnx.load(str(int8_bundle / MODEL_FILE))
    initializers = {i.name: i for i in model.graph.initializer}
    int8 = _int8_weights(model)
    scales = {n.input[0]: initializers[n.input[1]] for n in model.graph.node if n.input[0] in int8}
    stacked = [name for name, weight in int8.items() if len(weight.dims) == 3]
    assert len(stacked) == 2  # the per-task qkv of each of the 2 blocks, shape (tasks, dim, 3 dim)
    for name, weight in int8.items():
        columns = weight.dims[-1]
        assert list(scales[name].dims) == ([] if len(weight.dims) == 3 else [columns]), name


def test_onnxruntime_runs_every_quantised_matmul_as_one_int8_kernel(int8_bundle: Path, tmp_path: Path):
    """Q/DQ sit on MatMul inputs, so ORT's CPU provider runs each DQ -> MatMul as one int8 kernel: MatMulIntegerToFloat,
    or QLinearMatMul where the result feeds another MatMul's quantised input."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(int8_bundle / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    before = [n.op_type for n in onnx.load(str(int8_bundle / MODEL_FILE)).graph.node]
    after = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    assert after.count("MatMulIntegerToFloat") + after.count("QLinearMatMul") == before.count("MatMul") > 0
    assert after.count("MatMulIntegerToFloat") >= 8  # every weight matmul keeps a float result
    assert "MatMul" not in after and "DequantizeLinear" not in after


def test_tensorrt_target_also_quantises_convolutions(endoarss_bundle: Path, labelled_data: Path, tmp_path: Path):
    manifest = quantize_bundle(endoarss_bundle, labelled_data / "train", target="tensorrt", out=tmp_path, count=4)
    assert manifest.checks["quantization"]["target"] == "tensorrt"
    model = onnx.load(str(tmp_path / MODEL_FILE))
    convolutions = _dequantized_inputs(model, "Conv")
    assert convolutions and all(all(pair) for pair in convolutions)
    assert len(_int8_weights(model)) == 8 + len(convolutions) + 1  # and the activity classifier (Gemm)
    with pytest.raises(ValueError, match="target 'gpu'"):
        quantize_bundle(endoarss_bundle, labelled_data, target="gpu", out=tmp_path / "other")


def test_manifest_records_precision_provenance_and_accuracy_delta(int8_bundle: Path, endoarss_bundle: Path):
    manifest = read_manifest(int8_bundle)  # verifies the INT8 graph's sha256
    fp32 = read_manifest(endoarss_bundle)
    assert manifest.precision == "int8" and manifest.model_sha256 != fp32.model_sha256
    quantization = manifest.checks["quantization"]
    assert quantization["format"] == "QDQ" and quantization["calibration_frames"] == 16
    assert quantization["fp32_model_sha256"] == fp32.model_sha256
    accuracy = manifest.checks["accuracy"]
    assert accuracy["split"] == "test" and accuracy["images"] == accuracy["fp32"]["images"] > 0
    for key in ("activity_accuracy", "miou"):
        assert accuracy["delta"][key] == pytest.approx(accuracy["int8"][key] - accuracy["fp32"][key])


def test_int8_outputs_follow_fp32(int8_bundle: Path, endoarss_bundle: Path):
    frames = generated_frames(4, SIZE, SIZE, seed=11)
    fp32 = onnxruntime_session(endoarss_bundle / MODEL_FILE).run(None, {"frames": frames})
    int8 = onnxruntime_session(int8_bundle / MODEL_FILE).run(None, {"frames": frames})
    assert int8[0].shape == fp32[0].shape and int8[1].dtype == np.uint8
    assert np.abs(int8[0] - fp32[0]).max() < 0.1
    assert (int8[1] == fp32[1]).mean() > 0.8


def test_calibration_reads_frames_not_masks(labelled_data: Path, tmp_path: Path):
    frames = calibration_frames(labelled_data, 32, 48, count=500)
    images = len(list(labelled_data.rglob("image/*.png")))
    assert frames.shape == (images, 32, 48, 3) and frames.dtype == np.uint8
    with pytest.raises(FileNotFoundError, match="no images"):
        calibration_frames(tmp_path, 32, 32)


def test_only_fp32_bundles_are_quantised(int8_bundle: Path, labelled_data: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="holds an int8 graph"):
        quantize_bundle(int8_bundle, labelled_data, out=tmp_path / "again")


def test_cli(endoarss_bundle: Path, labelled_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "q"
    code = main(
        ["export", "quantize", str(endoarss_bundle), "--calib", str(labelled_data), "--out", str(out), "--frames", "8"]
    )
    assert code == 0 and "INT8 bundle" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["precision"] == "int8"


def test_dynamic_mode_needs_no_calibration_and_quantises_matmuls(endoarss_bundle: Path, tmp_path: Path):
    manifest = quantize_bundle(endoarss_bundle, None, mode="dynamic", out=tmp_path / "dyn")
    assert manifest.precision == "int8" and manifest.checks["quantization"]["mode"] == "dynamic"
    model = onnx.load(str(tmp_path / "dyn" / MODEL_FILE))
    ops = {n.op_type for n in model.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops
    frames = generated_frames(2, SIZE, SIZE, seed=3)
    fp32 = onnxruntime_session(endoarss_bundle / MODEL_FILE).run(None, {"frames": frames})
    int8 = onnxruntime_session(tmp_path / "dyn" / MODEL_FILE).run(None, {"frames": frames})
    assert np.abs(int8[0] - fp32[0]).max() < 0.1 and (int8[1] == fp32[1]).mean() > 0.8
    with pytest.raises(ValueError, match="--calib"):
        quantize_bundle(endoarss_bundle, None, out=tmp_path / "static")
    with pytest.raises(ValueError, match="mode"):
        quantize_bundle(endoarss_bundle, None, mode="fp8", out=tmp_path / "other")
