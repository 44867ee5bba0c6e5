"""`endostream export triton`: the repository's config.pbtxt, parsed with Triton's own proto, matches the graph."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from endostream.cli import main
from export.manifest import read_manifest
from export.triton import write_triton_repository

ONNX_TO_TRITON = {
    onnx.TensorProto.UINT8: model_config_pb2.TYPE_UINT8,
    onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
}


def _parse(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_config_matches_the_onnx_inputs_and_outputs(endoarss_bundle: Path, tmp_path: Path):
    folder = write_triton_repository(endoarss_bundle, tmp_path / "repo", max_batch=16, max_queue_delay_us=500)
    config = _parse(folder)
    assert folder.name == config.name == "endoarss_tiny"
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    graph = onnx.load(str(folder / "1" / "model.onnx")).graph
    for declared, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in values]
        for tensor, value in zip(declared, values, strict=True):
            shape = value.type.tensor_type.shape.dim
            assert shape[0].dim_param, "the batch axis stays dynamic in the graph"
            assert list(tensor.dims) == [d.dim_value for d in shape[1:]]
            assert tensor.data_type == ONNX_TO_TRITON[value.type.tensor_type.elem_type]
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_labels_and_provenance_travel_with_the_model(endoarss_bundle: Path, tmp_path: Path):
    folder = write_triton_repository(endoarss_bundle, tmp_path / "repo", name="endo", kind="cpu")
    config = _parse(folder)
    probs = next(o for o in config.output if o.name == "activity_probs")
    assert probs.label_filename == "activity_labels.txt"
    manifest = read_manifest(endoarss_bundle)
    activity = next(t for t in manifest.tasks if t.name == "activity")
    assert (folder / probs.label_filename).read_text().splitlines() == activity.classes
    assert json.loads((folder / "manifest.json").read_text())["model_sha256"] == manifest.model_sha256
    assert (folder / "1" / "model.onnx").read_bytes() == (endoarss_bundle / "model.onnx").read_bytes()
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_existing_model_and_bad_settings_are_refused(endoarss_bundle: Path, tmp_path: Path):
    write_triton_repository(endoarss_bundle, tmp_path / "repo")
    with pytest.raises(ValueError, match="--overwrite"):
        write_triton_repository(endoarss_bundle, tmp_path / "repo")
    write_triton_repository(endoarss_bundle, tmp_path / "repo", overwrite=True)
    with pytest.raises(ValueError, match="max_batch"):
        write_triton_repository(endoarss_bundle, tmp_path / "other", max_batch=0)
    with pytest.raises(ValueError, match="instance kind"):
        write_triton_repository(endoarss_bundle, tmp_path / "other", kind="tpu")


def test_cli(endoarss_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["export", "triton", str(endoarss_bundle), "--out", str(tmp_path / "repo"), "--kind", "cpu"]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    assert _parse(tmp_path / "repo" / "endoarss_tiny").instance_group[0].count == 1
