"""EndoARSS builder: DINOv2 + shared LoRA + TESLA per-task streams + SMA, ASPP and activity heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from training.adapters.tuner import mark_only_adapters_trainable
from training.builders.shared import attach_adapters, build_configured_backbone, build_task_heads, check_image_size
from training.config import ModelConfig
from training.layers.sma import SMA
from training.models.endoarss import EndoARSS


def build(
    cfg: ModelConfig,
    tasks: Sequence[dict[str, Any]],
    *,
    load_backbone_weights: bool = True,
    merged: bool = False,
) -> EndoARSS:
    """EndoARSS (paper): DINOv2 + shared LoRA + TESLA per-task streams + SMA, ASPP and activity heads."""
    backbone = build_configured_backbone(cfg.backbone, load_weights=load_backbone_weights, frozen=cfg.backbone.freeze)
    height, width = check_image_size(cfg, backbone.patch_size)
    patch = backbone.patch_size
    names = [t["name"] for t in tasks]
    adapters, per_task_streams = attach_adapters(backbone, cfg, names, merged=merged)
    if cfg.backbone.freeze and not merged:
        mark_only_adapters_trainable(backbone)

    grid = (height // patch, width // patch)
    dim = backbone.embed_dim
    heads = build_task_heads(cfg, tasks, dim, grid)
    sma = None
    if cfg.sma.enabled:
        sma = SMA(
            in_chans=3,
            dim=cfg.sma.dim,
            kernel_size=cfg.sma.kernel_size,
            patch_size=tuple(cfg.sma.patch_size),
            groups=cfg.sma.groups,
        )
    return EndoARSS(
        backbone=backbone,
        heads=heads,
        task_kinds={t["name"]: t["kind"] for t in tasks},
        sma=sma,
        per_task_streams=per_task_streams,
        pixel_mean=tuple(cfg.pixel_mean),
        pixel_std=tuple(cfg.pixel_std),
    )
