"""`endostream export onnx`: graph validity, weight content, ONNX Runtime vs PyTorch parity, manifest, CLI.

Models are tiny random-init EndoARSS checkpoints with non-zero adapters (the LoRA B factors start at zero, so they
are randomised here) and BatchNorm statistics away from their defaults, so a factor or a statistic that did not
reach the graph changes the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from endostream.cli import main
from export.checks import adapter_initializers, initializer_sizes, onnxruntime_session
from export.manifest import MANIFEST_FILE, MODEL_FILE, read_manifest, sha256_file
from export.onnx_export import export_onnx, generated_frames
from tests.checkpoints import SIZE, make_checkpoint
from tests.export.parity import assert_bundle_matches_checkpoint, run_checkpoint
from training.adapters.tuner import AdapterLinear
from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("batch", [1, 8])
def test_onnxruntime_matches_the_unmerged_pytorch_model(endoarss_bundle: Path, endoarss_ckpt: Path, batch: int):
    assert_bundle_matches_checkpoint(endoarss_bundle, endoarss_ckpt, batch, SIZE)


def test_graph_interface_is_uint8_nhwc_in_and_results_out(endoarss_bundle: Path):
    model = onnx.load(str(endoarss_bundle / MODEL_FILE))
    (frames,) = model.graph.input
    tensor = frames.type.tensor_type
    assert frames.name == "frames" and tensor.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [SIZE, SIZE, 3]  # dynamic batch, model size, RGB last
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outputs == {"activity_probs": onnx.TensorProto.FLOAT, "segmentation": onnx.TensorProto.UINT8}
    ops = {node.op_type for node in model.graph.node}
    assert {"Softmax", "ArgMax"} <= ops  # the results are computed in the graph
    assert "Resize" not in {n.op_type for n in model.graph.node if "pos" in n.name}  # position grid pinned


def test_graph_weights_are_base_plus_per_task_deltas(endoarss_bundle: Path, endoarss_ckpt: Path):
    """Every weight once, adapted layers once per task with the factors folded in, and nothing else."""
    model = load_checkpoint(endoarss_ckpt).model
    tasks = model.tasks
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}
    assert adapted
    factors = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    base += sum(b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked"))
    base -= sum(b.numel() for m in adapted.values() for b in m.buffers(recurse=False))  # row indices of the factors
    extra_task_weights = (len(tasks) - 1) * sum(m.base_layer.weight.numel() for m in adapted.values())
    grid = (SIZE // model.backbone.patch_size) ** 2
    pinned = (model.backbone.pos_embed.shape[1] - 1 - grid) * model.backbone.embed_dim  # table cut to the grid

    proto = onnx.load(str(endoarss_bundle / MODEL_FILE))
    sizes = initializer_sizes(proto)
    assert adapter_initializers(proto) == []
    assert sum(sizes.values()) == base + extra_task_weights - pinned
    assert sum(sizes.values()) < base + extra_task_weights - pinned + factors
    constants = sum(
        int(np.prod(a.t.dims)) for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.t.dims
    )
    assert constants < 1000, "weights must be initializers, not hidden in Constant nodes"

    weights = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for name, layer in adapted.items():
        stacked = weights[f"model.{name.removesuffix('.base_layer')}.weight"]
        assert stacked.shape == (len(tasks), *layer.base_layer.weight.shape)
        for t, task in enumerate(tasks):
            expected = (layer.base_layer.weight + layer.delta_weight(task)).detach().numpy()
            np.testing.assert_allclose(stacked[t], expected, atol=1e-6, rtol=0)
        assert not np.allclose(stacked[0], stacked[1]), "TESLA gives each task its own weights"


def test_model_without_sma_exports_with_parity(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "best", ["model.sma.enabled=false"])
    result = export_onnx(ckpt, tmp_path / "bundle")
    assert result.manifest.checks["parity"]["passed"]
    assert_bundle_matches_checkpoint(tmp_path / "bundle", ckpt, 8, SIZE)


def test_merged_checkpoint_gives_the_same_graph_results(tmp_path: Path, endoarss_bundle: Path, endoarss_ckpt: Path):
    merged = make_checkpoint(tmp_path / "best-merged", [], merged=True)
    export_onnx(merged, tmp_path / "bundle", logits=True)
    frames = generated_frames(4, SIZE, SIZE, seed=9)
    a = onnxruntime_session(endoarss_bundle / MODEL_FILE).run(None, {"frames": frames})
    b = onnxruntime_session(tmp_path / "bundle" / MODEL_FILE).run(None, {"frames": frames})
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert (a[1] == b[1]).mean() >= 0.999
    assert len(b) == 4  # + activity_logits, segmentation_logits


def test_manifest_describes_the_bundle(endoarss_bundle: Path, endoarss_ckpt: Path):
    manifest = read_manifest(endoarss_bundle)
    assert manifest.family == "endoarss" and manifest.precision == "fp32" and manifest.opset == 18
    assert manifest.model_sha256 == sha256_file(endoarss_bundle / MODEL_FILE)
    assert manifest.checkpoint_sha256 == sha256_file(endoarss_ckpt / "model.safetensors")
    assert (manifest.input.layout, manifest.input.dtype, manifest.input.color_order) == ("NHWC", "uint8", "RGB")
    assert (manifest.input.height, manifest.input.width) == (SIZE, SIZE)
    by_name = {t.name: t for t in manifest.tasks}
    assert by_name["activity"].output == "activity_probs" and len(by_name["activity"].classes) == 5
    assert by_name["segmentation"].output == "segmentation" and len(by_name["segmentation"].colors) == 8
    parity = manifest.checks["parity"]
    assert parity["passed"] and parity["batches"] == [1, 8] and parity["max_prob_diff"] <= 1e-4


def test_modified_graph_is_refused(tmp_path: Path, endoarss_bundle: Path):
    copy = tmp_path / "bundle"
    copy.mkdir()
    (copy / MANIFEST_FILE).write_text((endoarss_bundle / MANIFEST_FILE).read_text())
    (copy / MODEL_FILE).write_bytes((endoarss_bundle / MODEL_FILE).read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        read_manifest(copy)
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        read_manifest(tmp_path)


def test_bad_requests_name_the_value_and_the_fix(tmp_path: Path, endoarss_ckpt: Path, endoarss_bundle: Path):
    with pytest.raises(ValueError, match="multiples of the patch size 8: try 64x96"):
        export_onnx(endoarss_ckpt, tmp_path / "b", height=70, width=100)
    with pytest.raises(ValueError, match="opset 13 is too old"):
        export_onnx(endoarss_ckpt, tmp_path / "b", opset=13)
    with pytest.raises(ValueError, match="--overwrite"):
        export_onnx(endoarss_ckpt, endoarss_bundle)
    assert not (tmp_path / "b" / MODEL_FILE).exists()


def test_cli_exports_at_another_size(tmp_path: Path, endoarss_ckpt: Path, capsys: pytest.CaptureFixture):
    code = main(["export", "onnx", str(endoarss_ckpt), "--out", str(tmp_path / "b"), "--height", "48", "--width", "80"])
    assert code == 0
    assert "parity max prob diff" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "b" / MANIFEST_FILE).read_text())
    assert (manifest["input"]["height"], manifest["input"]["width"]) == (48, 80)
    session = onnxruntime_session(tmp_path / "b" / MODEL_FILE)
    probs, mask = session.run(None, {"frames": np.zeros((2, 48, 80, 3), np.uint8)})
    assert probs.shape == (2, 5) and mask.shape == (2, 48, 80)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_single_task_graph_computes_only_that_task(tmp_path: Path, endoarss_ckpt: Path):
    result = export_onnx(endoarss_ckpt, tmp_path / "seg", tasks=["segmentation"])
    assert [t.name for t in result.manifest.tasks] == ["segmentation"]
    session = onnxruntime_session(tmp_path / "seg" / MODEL_FILE)
    assert [o.name for o in session.get_outputs()] == ["segmentation"]
    frames = generated_frames(2, SIZE, SIZE, seed=5)
    (mask,) = session.run(None, {"frames": frames})
    assert (mask == run_checkpoint(endoarss_ckpt, frames)["segmentation"]).mean() >= 0.999
    with pytest.raises(ValueError, match="distinct tasks of this model"):
        export_onnx(endoarss_ckpt, tmp_path / "bad", tasks=["phase"])


def test_merged_shared_lora_graph_is_the_plain_backbone_graph(tmp_path: Path):
    """Without TESLA the folded LoRA leaves no trace: same ops and weight count as a model that never had adapters."""
    shared_only = make_checkpoint(tmp_path / "lora", ["model.adapters.task_rank=0"])
    plain = make_checkpoint(tmp_path / "plain", ["model.adapters.task_rank=0", "model.adapters.shared_rank=0"])
    graphs = []
    for ckpt in (shared_only, plain):
        export_onnx(ckpt, ckpt.parent / f"{ckpt.name}-bundle")
        graphs.append(onnx.load(str(ckpt.parent / f"{ckpt.name}-bundle" / MODEL_FILE)))
    ops = [sorted(n.op_type for n in g.graph.node) for g in graphs]
    assert ops[0] == ops[1]
    assert sum(initializer_sizes(graphs[0]).values()) == sum(initializer_sizes(graphs[1]).values())
