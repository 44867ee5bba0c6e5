"""`endostream export onnx` for the BDTA + MoTE family: the same checks and parity as EndoARSS bundles.

The checkpoint is a tiny random-init BDTA model with MoTE's gamma randomised (it starts at zero, which would hide
the routers and the cross-task path) and BatchNorm statistics away from their defaults, so a part that did not
reach the graph changes the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from endostream.cli import main
from export.checks import adapter_initializers, onnxruntime_session
from export.manifest import MODEL_FILE, read_manifest
from export.onnx_export import export_onnx, generated_frames
from tests.checkpoints import make_checkpoint
from tests.export.parity import assert_bundle_matches_checkpoint, run_checkpoint
from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.timeout(300)

SIZE = 64
SMALL = [
    f"model.image_size=[{SIZE}, {SIZE}]",
    "model.heads.segmentation_channels=16",
    "model.heads.activity_channels=16",
    "model.backbone.overrides={embed_dim: 32, depth: 4, num_heads: 2}",
    "model.bdta.num_heads=2",
    "model.bdta.mote_dim=16",
]


def _gamma(name: str, param: torch.nn.Parameter) -> None:
    if name.startswith("mote.gamma."):  # zero-initialised: MoTE would mix nothing
        param.normal_(0, 1.0)


def make_bdta_checkpoint(root: Path, *, merged: bool = False) -> Path:
    return make_checkpoint(root, [], merged=merged, config="tiny_bdta", base=SMALL, perturb=_gamma)


@pytest.fixture(scope="module")
def bdta_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bdta_checkpoint(tmp_path_factory.mktemp("bdta-ckpt") / "best")


@pytest.fixture(scope="module")
def bdta_bundle(bdta_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bdta-bundle")
    export_onnx(bdta_ckpt, out, overwrite=True)
    return out


@pytest.mark.parametrize("batch", [1, 8])
def test_onnxruntime_matches_the_pytorch_model(bdta_bundle: Path, bdta_ckpt: Path, batch: int):
    assert_bundle_matches_checkpoint(bdta_bundle, bdta_ckpt, batch, SIZE)


def test_manifest_records_the_family_and_passed_checks(bdta_bundle: Path):
    manifest = read_manifest(bdta_bundle)
    assert manifest.family == "bdta" and manifest.checks["onnx_checker"] == "full"
    parity = manifest.checks["parity"]
    assert parity["passed"] and parity["batches"] == [1, 8] and parity["max_prob_diff"] <= 1e-4
    assert [t.output for t in manifest.tasks] == ["activity_probs", "segmentation"]


def test_graph_has_no_training_only_weights_and_a_pinned_position_grid(bdta_bundle: Path, bdta_ckpt: Path):
    proto = onnx.load(str(bdta_bundle / MODEL_FILE))
    (frames,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in frames.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [SIZE, SIZE, 3]
    names = [i.name for i in proto.graph.initializer]
    assert adapter_initializers(proto) == []
    assert not [n for n in names if ".noise." in n], "router noise MLPs are training-only"
    assert [n for n in names if ".gate." in n] and [n for n in names if "gamma" in n]
    assert "Resize" not in {n.op_type for n in proto.graph.node if "pos" in n.name}
    assert "RandomNormalLike" not in {n.op_type for n in proto.graph.node}
    model = load_checkpoint(bdta_ckpt).model
    grid = (SIZE // model.backbone.patch_size) ** 2
    pos = [i for i in proto.graph.initializer if i.name.endswith("pos_embed")]
    assert [list(i.dims) for i in pos] == [[1, 1 + grid, model.backbone.embed_dim]]


def test_merged_checkpoint_exports_the_same_graph_results(tmp_path: Path, bdta_bundle: Path):
    merged = make_bdta_checkpoint(tmp_path / "best-merged", merged=True)
    export_onnx(merged, tmp_path / "bundle", logits=True)
    frames = generated_frames(4, SIZE, SIZE, seed=9)
    a = onnxruntime_session(bdta_bundle / MODEL_FILE).run(None, {"frames": frames})
    b = onnxruntime_session(tmp_path / "bundle" / MODEL_FILE).run(None, {"frames": frames})
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert (a[1] == b[1]).mean() >= 0.999 and len(b) == 4


def test_cli_exports_at_another_size(tmp_path: Path, bdta_ckpt: Path):
    code = main(["export", "onnx", str(bdta_ckpt), "--out", str(tmp_path / "b"), "--height", "48", "--width", "80"])
    assert code == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert (manifest["input"]["height"], manifest["input"]["width"]) == (48, 80)
    frames = generated_frames(2, 48, 80, seed=3)
    probs, mask = onnxruntime_session(tmp_path / "b" / MODEL_FILE).run(None, {"frames": frames})
    assert probs.shape == (2, 5) and mask.shape == (2, 48, 80)
    want = run_checkpoint(bdta_ckpt, frames)  # the model resamples its position table for 48 x 80 itself
    np.testing.assert_allclose(probs, want["activity_probs"], atol=1e-4, rtol=0)
    assert (mask == want["segmentation"]).mean() >= 0.999


def test_single_task_graph(tmp_path: Path, bdta_ckpt: Path):
    result = export_onnx(bdta_ckpt, tmp_path / "seg", tasks=["segmentation"])
    assert [t.name for t in result.manifest.tasks] == ["segmentation"]
    frames = generated_frames(2, SIZE, SIZE, seed=5)
    (mask,) = onnxruntime_session(tmp_path / "seg" / MODEL_FILE).run(None, {"frames": frames})
    assert (mask == run_checkpoint(bdta_ckpt, frames)["segmentation"]).mean() >= 0.999
