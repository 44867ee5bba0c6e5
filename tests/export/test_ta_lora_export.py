"""`export onnx` of a TA-LoRA EndoARSS checkpoint: parity, and a graph holding base + per-task weights, no factor.

The checkpoint is the shipped `tiny_talora` config at the test size, random-init, with a non-zero Tucker core (G
starts at zero, which would make every task's weight the base weight) and BatchNorm statistics away from their
defaults, so a factor or a statistic that did not reach the graph changes the outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.checks import adapter_initializers, initializer_sizes
from export.manifest import MODEL_FILE
from export.onnx_export import export_onnx, generated_frames
from tests.checkpoints import SIZE, make_checkpoint
from tests.export.parity import run_bundle
from training.adapters.ta_lora import TaskAwareLoraVariant, uses_ta_lora
from training.adapters.tuner import AdapterLinear
from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.timeout(120)


def _core(name: str, param: torch.nn.Parameter) -> None:
    if name.endswith("ta_lora_G"):  # the zero core: no update without it
        param.normal_(0, 0.05)


def make_ta_lora_checkpoint(root: Path, overrides: list[str], *, merged: bool = False) -> Path:
    return make_checkpoint(root, overrides, merged=merged, config="tiny_talora", perturb=_core)


@pytest.fixture(scope="module")
def ta_lora_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ta_lora_checkpoint(tmp_path_factory.mktemp("talora") / "best", [])


@pytest.fixture(scope="module")
def ta_lora_bundle(ta_lora_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("talora-bundle")
    result = export_onnx(ta_lora_ckpt, out, overwrite=True)
    assert result.manifest.checks["parity"]["passed"]
    return out


@pytest.mark.parametrize("batch", [1, 8])
def test_onnxruntime_matches_the_unmerged_ta_lora_model(ta_lora_bundle: Path, ta_lora_ckpt: Path, batch: int):
    frames = generated_frames(batch, SIZE, SIZE, seed=5)
    got = run_bundle(ta_lora_bundle, frames)
    model = load_checkpoint(ta_lora_ckpt).model.eval()
    assert model.per_task_streams
    with torch.no_grad():
        want = model(torch.from_numpy(frames).permute(0, 3, 1, 2))
    np.testing.assert_allclose(got["activity_probs"], want["activity"].softmax(1).numpy(), atol=1e-4, rtol=0)
    mask = want["segmentation"].argmax(1).numpy().astype(np.uint8)
    assert got["segmentation"].shape == (batch, SIZE, SIZE)
    assert (got["segmentation"] == mask).mean() >= 0.999


def test_graph_weights_are_base_plus_per_task_deltas_without_tucker_factors(ta_lora_bundle: Path, ta_lora_ckpt: Path):
    model = load_checkpoint(ta_lora_ckpt).model
    tasks = model.tasks
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}
    assert adapted and all(uses_ta_lora(m) for m in adapted.values())
    factor_names = TaskAwareLoraVariant.factor_names
    is_factor = [(n, p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in factor_names]
    assert len(is_factor) == 4 * len(adapted)
    factors = sum(p.numel() for _, p in is_factor)
    base = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] not in factor_names)
    base += sum(b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked"))
    base -= sum(b.numel() for m in adapted.values() for b in m.buffers(recurse=False))
    extra_task_weights = (len(tasks) - 1) * sum(m.base_layer.weight.numel() for m in adapted.values())
    grid = (SIZE // model.backbone.patch_size) ** 2
    pinned = (model.backbone.pos_embed.shape[1] - 1 - grid) * model.backbone.embed_dim

    proto = onnx.load(str(ta_lora_bundle / MODEL_FILE))
    sizes = initializer_sizes(proto)
    assert adapter_initializers(proto) == []
    assert not [name for name in sizes if "ta_lora" in name or "base_layer" in name]
    assert sum(sizes.values()) == base + extra_task_weights - pinned
    assert sum(sizes.values()) < base + extra_task_weights - pinned + factors

    weights = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for name, layer in adapted.items():
        stacked = weights[f"model.{name}.weight"]
        assert stacked.shape == (len(tasks), *layer.base_layer.weight.shape)
        for t, task in enumerate(tasks):
            expected = (layer.base_layer.weight + layer.delta_weight(task)).detach().numpy()
            np.testing.assert_allclose(stacked[t], expected, atol=1e-6, rtol=0)
        assert not np.allclose(stacked[0], stacked[1]), "each task has its own slice of the update tensor"


def test_merged_ta_lora_checkpoint_gives_the_same_graph_results(tmp_path: Path, ta_lora_bundle: Path):
    merged = make_ta_lora_checkpoint(tmp_path / "best-merged", [], merged=True)
    assert not [k for k in load_checkpoint(merged).model.state_dict() if "ta_lora" in k]
    export_onnx(merged, tmp_path / "bundle")
    frames = generated_frames(4, SIZE, SIZE, seed=9)
    a, b = run_bundle(ta_lora_bundle, frames), run_bundle(tmp_path / "bundle", frames)
    np.testing.assert_allclose(a["activity_probs"], b["activity_probs"], atol=1e-5)
    assert (a["segmentation"] == b["segmentation"]).mean() >= 0.999


def test_adapter_check_flags_every_tucker_factor_name():
    names = [f"model.backbone.blocks.0.attn.qkv.{factor}" for factor in TaskAwareLoraVariant.factor_names]
    initializers = [onnx.numpy_helper.from_array(np.zeros(2, np.float32), name) for name in [*names, "model.w"]]
    graph = onnx.helper.make_graph([], "g", [], [], initializer=initializers)
    assert adapter_initializers(onnx.helper.make_model(graph)) == names
