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


def test_int8_graph_is_qdq_with_int8_weights(int8_bundle: Path):
    model = onnx.load(str(int8_bundle / MODEL_FILE))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) >= 10  # qkv / proj / fc1 / fc2 per block and the head convolutions
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


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
