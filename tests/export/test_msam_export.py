"""`endostream export onnx` for the mSAM family: the same checks and parity as EndoARSS bundles, TA-LoRA folded.

The checkpoint is a tiny random-init mSAM (SAM tiny encoder at patch 8, 64 px: an 8 x 8 grid of 4 x 4 windows plus
two global blocks) with TA-LoRA's core randomised (it starts at zero, which would make the per-task streams identical
and hide a missing merge) and the activity classifier scaled up so its probabilities are far from uniform.
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
    f"model.backbone.overrides={{img_size: [{SIZE}, {SIZE}], patch_size: 8}}",
    "model.msam.mlp_dim=32",
]


def _core_and_classifiers(name: str, param: torch.nn.Parameter) -> None:
    if name.endswith("ta_lora_G"):
        param.normal_(0, 0.05)
    elif name.startswith("classifiers.") and name.endswith("weight"):
        param.mul_(20.0)


def make_msam_checkpoint(root: Path, *, merged: bool = False) -> Path:
    return make_checkpoint(root, [], merged=merged, config="tiny_msam", base=SMALL, perturb=_core_and_classifiers)


@pytest.fixture(scope="module")
def msam_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_msam_checkpoint(tmp_path_factory.mktemp("msam-ckpt") / "best")


@pytest.fixture(scope="module")
def msam_bundle(msam_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("msam-bundle")
    export_onnx(msam_ckpt, out, overwrite=True)
    return out


@pytest.mark.parametrize("batch", [1, 8])
def test_onnxruntime_matches_the_pytorch_model(msam_bundle: Path, msam_ckpt: Path, batch: int):
    got, want = assert_bundle_matches_checkpoint(msam_bundle, msam_ckpt, batch, SIZE)
    assert want["activity_probs"].max() > 0.5, "probabilities near uniform would hide differences"
    assert len(np.unique(want["segmentation"])) > 1


def test_manifest_records_the_family_and_passed_checks(msam_bundle: Path):
    manifest = read_manifest(msam_bundle)
    assert manifest.family == "msam" and manifest.checks["onnx_checker"] == "full"
    parity = manifest.checks["parity"]
    assert parity["passed"] and parity["batches"] == [1, 8] and parity["max_prob_diff"] <= 1e-4
    assert parity["mask_agreement"] >= 0.999
    assert [t.output for t in manifest.tasks] == ["activity_probs", "segmentation"]


def test_graph_has_no_adapter_factors_and_pinned_tables(msam_bundle: Path, msam_ckpt: Path):
    proto = onnx.load(str(msam_bundle / MODEL_FILE))
    (frames,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in frames.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [SIZE, SIZE, 3]
    names = [i.name for i in proto.graph.initializer]
    assert adapter_initializers(proto) == [] and not [n for n in names if "ta_lora" in n]
    model = load_checkpoint(msam_ckpt).model
    grid = SIZE // model.backbone.patch_size
    pos = [i for i in proto.graph.initializer if i.name.endswith("pos_embed")]
    assert [list(i.dims) for i in pos] == [[1, grid, grid, model.backbone.embed_dim]]
    ops = {n.op_type for n in proto.graph.node}
    assert "Sin" not in ops and "Cos" not in ops, "the decoders' grid encoding is a pinned constant"
    # each block's qkv holds one merged weight per task stream (stacked T out in); both decoders are in the graph
    qkv = [i for i in proto.graph.initializer if i.name.endswith("attn.qkv.weight")]
    assert len(qkv) == len(model.backbone.blocks) and all(list(i.dims)[0] == 2 and len(i.dims) == 3 for i in qkv)
    assert {n.split(".")[2] for n in names if n.startswith("model.decoders.")} == {"activity", "segmentation"}


def test_merged_checkpoint_at_another_size_through_the_cli(tmp_path: Path, msam_ckpt: Path):
    merged = make_msam_checkpoint(tmp_path / "best-merged", merged=True)
    out = tmp_path / "bundle"
    assert main(["export", "onnx", str(merged), "--out", str(out), "--height", "48", "--width", "80"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["input"]["height"], manifest["input"]["width"]) == (48, 80) and manifest["checks"]["source_merged"]
    frames = generated_frames(2, 48, 80, seed=3)
    probs, mask = onnxruntime_session(out / MODEL_FILE).run(None, {"frames": frames})
    assert probs.shape == (2, 5) and mask.shape == (2, 48, 80)
    want = run_checkpoint(msam_ckpt, frames)  # the unmerged model resamples its tables for 48 x 80 itself
    np.testing.assert_allclose(probs, want["activity_probs"], atol=1e-4, rtol=0)
    assert (mask == want["segmentation"]).mean() >= 0.999
