"""Shared fixtures: one small synthetic dataset per test session (generated, never downloaded)."""

from pathlib import Path

import pytest

from training.data.writer import synthesize_dataset


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthesize_dataset(root, images=48, seed=3, height=96, width=96, progress=False)
    return root


TINY_OVERRIDES = [
    "model.image_size=[64, 64]",
    "model.heads.segmentation_channels=16",
    "model.heads.activity_channels=16",
    "model.backbone.overrides={embed_dim: 32, depth: 2, num_heads: 2}",
    "train.batch_size=8",
    "train.eval_batch_size=8",
    "optim.warmup_epochs=0",
]
