"""Pieces every family builder shares: adapter config from the model config, the configured backbone, image-size
checks, adapters on the backbone, task heads, and parameter counts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from training.adapters.tuner import (
    AdapterConfig,
    apply_adapters,
    prepare_for_merged_weights,
)
from training.builders.backbones import build_backbone, describe
from training.config import BackboneConfig, ModelConfig
from training.models.heads import ActivityHead, ProjectedHead, SegmentationHead, aspp_rates_for_grid

logger = logging.getLogger(__name__)


def adapter_config(cfg: ModelConfig, task_names: Sequence[str]) -> AdapterConfig | None:
    """The backbone's adapter config, or None when `kind` is lora_tesla and neither shared LoRA nor TESLA is enabled."""
    section = cfg.adapters
    if section.kind == "lora_tesla" and section.shared_rank == 0 and section.task_rank == 0:
        return None
    return AdapterConfig(
        tasks=tuple(task_names),
        shared_rank=section.shared_rank,
        task_rank=section.task_rank,
        alpha=section.alpha,
        dropout=section.dropout,
        targets=tuple(section.targets),
        layers=tuple(section.layers) if section.layers is not None else None,
        kind=section.kind,
        ta_lora_ranks=tuple(section.ta_lora_ranks),
        ta_lora_scaling=section.ta_lora_scaling,
        orth_weight=section.orth_weight,
        orth_penalty=section.orth_penalty,
        tune_layernorm=section.tune_layernorm,
    )


def build_configured_backbone(section: BackboneConfig, *, load_weights: bool, frozen: bool) -> nn.Module:
    """The backbone `section` names, with the pretrained weights of `section.checkpoint` when `load_weights`.

    A `frozen` backbone without a checkpoint stays at its random init for the whole run. That can be meant (the CPU
    `tiny_bdta` config does it on purpose: adapters and heads learn on random features) but usually means a missing
    `model.backbone.checkpoint`, so it is said once, loudly.
    """
    checkpoint = section.checkpoint if load_weights else None
    if load_weights and frozen and checkpoint is None:
        logger.warning(
            "backbone %s is frozen at its random init (no model.backbone.checkpoint): only adapters and heads will "
            "learn. Point model.backbone.checkpoint at a local pretrained file, or set model.backbone.freeze=false",
            section.name,
        )
    return build_backbone(section.name, checkpoint, **dict(section.overrides))


def check_image_size(cfg: ModelConfig, patch: int) -> tuple[int, int]:
    """`cfg.image_size` as (height, width); ValueError with the nearest valid size unless both divide by `patch`."""
    height, width = cfg.image_size
    if height % patch or width % patch:
        raise ValueError(
            f"model.image_size {cfg.image_size} must be a multiple of the patch size {patch}: "
            f"try [{height // patch * patch}, {width // patch * patch}]"
        )
    return height, width


def attach_adapters(
    backbone: nn.Module, cfg: ModelConfig, task_names: Sequence[str], *, merged: bool
) -> tuple[AdapterConfig | None, bool]:
    """Wrap `backbone`'s target layers with the configured adapters (or, for a merged checkpoint, give them the
    per-task stacked weight shapes); returns the adapter config and whether tasks run in their own token streams.

    A merged checkpoint without per-task weights needs nothing: the shared LoRA was folded into plain Linears.
    """
    adapters = adapter_config(cfg, task_names)
    per_task_streams = adapters is not None and adapters.per_task and len(task_names) > 1
    if adapters is not None:
        if not merged:
            apply_adapters(backbone, adapters)
        elif per_task_streams:
            prepare_for_merged_weights(backbone, adapters)
    return adapters, per_task_streams


def build_task_heads(
    cfg: ModelConfig, tasks: Sequence[dict[str, Any]], dim: int, grid: tuple[int, int]
) -> nn.ModuleDict:
    """The ASPP segmentation head and the pooled activity head per task, on `dim`-channel features at `grid`
    (behind a 1x1 projection to `heads.input_dim` channels when that is set)."""
    width = cfg.heads.input_dim or dim
    heads = nn.ModuleDict()
    for task in tasks:
        classes = len(task["classes"])
        if task["kind"] == "segmentation":
            head: nn.Module = SegmentationHead(
                width,
                classes,
                channels=cfg.heads.segmentation_channels,
                rates=aspp_rates_for_grid(grid),
                dropout=cfg.heads.dropout,
            )
        else:
            head = ActivityHead(width, classes, channels=cfg.heads.activity_channels, pool=cfg.heads.activity_pool)
        heads[task["name"]] = head if cfg.heads.input_dim is None else ProjectedHead(dim, width, head)
    return heads


def resolved_backbone_overrides(backbone: nn.Module) -> dict[str, Any]:
    """Constructor kwargs that rebuild `backbone`'s exact architecture without its source checkpoint.

    A Hugging Face directory or an original .pth may define an architecture the variant name does not (read from
    config.json or inferred from shapes); saved checkpoints record it so they load without the source file.
    """
    arch = describe(backbone)
    if hasattr(backbone, "interpolate_offset"):  # DINOv2 ViTs; CLIP/SAM encoders describe themselves fully
        arch["interpolate_offset"] = backbone.interpolate_offset
        arch["interpolate_antialias"] = backbone.interpolate_antialias
        arch["layer_norm_eps"] = backbone.norm.eps
    return arch


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
