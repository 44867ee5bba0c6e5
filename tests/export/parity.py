"""ONNX Runtime vs the checkpoint's PyTorch model on the same generated frames, shared by every family's export test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.checks import onnxruntime_session
from export.manifest import MODEL_FILE
from export.onnx_export import generated_frames
from training.checkpoint import load_checkpoint


def run_bundle(bundle: Path, frames: np.ndarray) -> dict[str, np.ndarray]:
    session = onnxruntime_session(bundle / MODEL_FILE)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"frames": frames}), strict=True))


def run_checkpoint(ckpt: Path, frames: np.ndarray) -> dict[str, np.ndarray]:
    """The training-form model (adapters unmerged, tables resampled on the fly) in the graph's output names."""
    model = load_checkpoint(ckpt).model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(frames).permute(0, 3, 1, 2))
    return {
        "activity_probs": out["activity"].softmax(1).numpy(),
        "segmentation": out["segmentation"].argmax(1).numpy().astype(np.uint8),
    }


def assert_bundle_matches_checkpoint(
    bundle: Path, ckpt: Path, batch: int, size: int, classes: int = 5, seed: int = 5
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Probabilities within 1e-4 and >= 99.9 % of mask pixels equal at `batch`; returns (onnx, torch) outputs."""
    frames = generated_frames(batch, size, size, seed=seed)
    got, want = run_bundle(bundle, frames), run_checkpoint(ckpt, frames)
    assert got["activity_probs"].shape == (batch, classes)
    assert got["segmentation"].shape == (batch, size, size) and got["segmentation"].dtype == np.uint8
    np.testing.assert_allclose(got["activity_probs"], want["activity_probs"], atol=1e-4, rtol=0)
    assert (got["segmentation"] == want["segmentation"]).mean() >= 0.999
    return got, want
