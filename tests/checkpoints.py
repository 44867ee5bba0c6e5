"""Tiny random-init EndoARSS checkpoints for tests (nothing downloaded, nothing trained)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from training.builders.registry import build_model
from training.checkpoint import save_checkpoint
from training.config import load_config
from training.data.writer import synth_labels

SIZE = 64
SMALL = [
    f"model.image_size=[{SIZE}, {SIZE}]",
    "model.heads.segmentation_channels=16",
    "model.heads.activity_channels=16",
    "model.backbone.overrides={embed_dim: 32, depth: 2, num_heads: 2}",
]


def _lora_b(name: str, param: nn.Parameter) -> None:
    if "lora_B" in name:
        param.normal_(0, 0.2)


def make_checkpoint(
    root: Path,
    overrides: list[str],
    *,
    merged: bool = False,
    config: str = "tiny",
    base: list[str] = SMALL,
    perturb: Callable[[str, nn.Parameter], None] = _lora_b,
) -> Path:
    """A random-init checkpoint of `config` with `base + overrides`, saved to `root`.

    Parts that start at zero or identity (LoRA B factors by default; `perturb(name, param)` is called on every
    parameter under no_grad) and the BatchNorm statistics are made non-trivial, so parity tests exercise them.
    """
    torch.manual_seed(0)
    cfg = load_config(config, base + overrides)
    labels = synth_labels({}).to_dict()
    model = build_model(cfg.model, labels["tasks"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            perturb(name, param)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    model.eval()
    return save_checkpoint(model, cfg, labels, root, merged=merged)
