"""`export_onnx` on SAK checkpoints: the bundle carries the student only (no teacher, aligner or router noise) and
passes the exporter's checks; ONNX Runtime matches the PyTorch checkpoint (full and LoRA-tuned stems)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.checks import adapter_initializers, initializer_sizes, onnxruntime_session
from export.manifest import MODEL_FILE, read_manifest
from export.onnx_export import export_onnx, generated_frames
from tests.checkpoints import make_checkpoint
from training.adapters.tuner import AdapterLinear
from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.timeout(120)

SIZE = 64
SMALL = [
    f"model.image_size=[{SIZE}, {SIZE}]",
    "model.backbone.overrides={embed_dim: 32, depth: 4, num_heads: 2}",
    "model.heads.segmentation_channels=16",
    "model.heads.activity_channels=16",
    "model.sak.cache=false",
    "model.sak.teachers=[{key: dino, name: vit_tiny_p8, input_size: 64, overrides: {embed_dim: 48, depth: 4, "
    "num_heads: 2}}, {key: sam, name: sam_tiny, input_size: 64}]",
]


def _lora_and_routers(name: str, param: torch.nn.Parameter) -> None:
    if "lora_B" in name or "routers" in name:
        param.normal_(0, 0.2)


def _checkpoint(root: Path, overrides: list[str]) -> Path:
    """A tiny SAK checkpoint with non-trivial LoRA factors, routers and BatchNorm statistics (random teachers)."""
    return make_checkpoint(root, overrides, config="tiny_sak", base=SMALL, perturb=_lora_and_routers)


@pytest.fixture(scope="module")
def sak_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("sak") / "best", ["model.sak.tas=lora", "model.adapters.shared_rank=4"])


@pytest.fixture(scope="module")
def sak_bundle(sak_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sak_bundle")
    export_onnx(sak_ckpt, out, overwrite=True)
    return out


def _assert_parity(bundle: Path, ckpt: Path, batch: int) -> None:
    frames = generated_frames(batch, SIZE, SIZE, seed=5)
    session = onnxruntime_session(bundle / MODEL_FILE)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"frames": frames}), strict=True))
    model = load_checkpoint(ckpt).model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(frames).permute(0, 3, 1, 2))
    np.testing.assert_allclose(got["activity_probs"], want["activity"].softmax(1).numpy(), atol=1e-4, rtol=0)
    assert (got["segmentation"] == want["segmentation"].argmax(1).numpy()).mean() >= 0.999


@pytest.mark.parametrize("batch", [1, 8])
def test_onnxruntime_matches_the_lora_checkpoint(sak_bundle: Path, sak_ckpt: Path, batch: int):
    _assert_parity(sak_bundle, sak_ckpt, batch)
    manifest = read_manifest(sak_bundle)
    assert manifest.family == "sak" and manifest.checks["parity"]["passed"]


def test_graph_holds_the_student_and_nothing_else(sak_bundle: Path, sak_ckpt: Path):
    """The graph's weights are the trained model's minus teachers, aligners, LoRA factors and router noise rows."""
    model = load_checkpoint(sak_ckpt).model
    assert model.teachers is None  # checkpoints never hold teachers
    adapted = [m for m in model.backbone.modules() if isinstance(m, AdapterLinear)]
    assert adapted
    weights = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    weights += sum(b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked"))
    weights -= sum(b.numel() for m in adapted for b in m.buffers(recurse=False))  # row indices of the factors
    aligners = sum(p.numel() for p in model.aligners.parameters())
    noise_rows = sum(
        r.fc2.weight.numel() // 2 + r.fc2.bias.numel() // 2 for levels in model.routers.values() for r in levels
    )
    stem_norm = sum(p.numel() for p in model.backbone.norm.parameters())  # levels are raw block outputs
    grid = (SIZE // model.backbone.patch_size) ** 2
    pinned = (model.backbone.pos_embed.shape[1] - 1 - grid) * model.backbone.embed_dim  # table cut to the grid
    assert aligners > 0 and noise_rows > 0

    proto = onnx.load(str(sak_bundle / MODEL_FILE))
    sizes = initializer_sizes(proto)
    assert sum(sizes.values()) == weights - aligners - noise_rows - stem_norm - pinned
    assert adapter_initializers(proto) == []
    assert not [name for name in sizes if "teachers" in name or "aligners" in name]
    student = model.inference_copy(SIZE, SIZE)
    assert student.teachers is None and student.aligners is None and student.feature_source is None
    assert all(not r.noisy_gating for levels in student.routers.values() for r in levels)


def test_full_fine_tuned_stem_exports_with_parity(tmp_path: Path):
    ckpt = _checkpoint(tmp_path / "best", ["model.sak.tas=full"])
    result = export_onnx(ckpt, tmp_path / "bundle")
    assert result.manifest.checks["parity"]["passed"]
    _assert_parity(tmp_path / "bundle", ckpt, 8)
