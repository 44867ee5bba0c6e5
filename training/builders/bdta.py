"""Build the BDTA + MoTE family (`model.family: bdta`) from a typed config.

`build` is registered in `training.builders.registry.FAMILIES`; the family's training-cost claim is measured by
`training.jobs.train_cost` (`endostream bench train`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from training.builders.shared import build_configured_backbone, build_task_heads, check_image_size
from training.config import ModelConfig
from training.layers.bdta import BDTA
from training.layers.mote import MoTE
from training.models.bdta import BDTAMoTE, evenly_spaced_blocks

logger = logging.getLogger(__name__)


def build(
    cfg: ModelConfig,
    tasks: Sequence[dict[str, Any]],
    *,
    load_backbone_weights: bool = True,
    merged: bool = False,
) -> BDTAMoTE:
    """BDTA + MoTE (paper): frozen ViT + BDTA bypass at `cfg.bdta` stages + MoTE + ASPP / activity heads.

    Args:
        cfg: model section; `cfg.bdta` sets the bypass branch, `cfg.heads` the heads.
        tasks: dicts with `name`, `kind` and `classes` (labels.json).
        load_backbone_weights: read the backbone checkpoint named by the config (False when a full checkpoint follows).
        merged: accepted for the `FAMILIES` signature; this family has no adapter factors to fold, so its merged
            and unmerged checkpoints hold the same architecture.
    """
    del merged  # same architecture either way
    if not cfg.backbone.freeze:
        raise ValueError(
            "model.family bdta keeps the backbone frozen (the main branch runs without gradients); "
            "set model.backbone.freeze=true"
        )
    if cfg.sma.enabled or cfg.adapters.shared_rank or cfg.adapters.task_rank:
        raise ValueError(
            "model.family bdta has no SMA and no backbone adapters (its adaptation is the bypass branch): set "
            "model.sma.enabled=false model.adapters.shared_rank=0 model.adapters.task_rank=0"
        )
    section = cfg.bdta
    backbone = build_configured_backbone(cfg.backbone, load_weights=load_backbone_weights, frozen=True)
    height, width = check_image_size(cfg, backbone.patch_size)
    patch = backbone.patch_size
    blocks = (
        tuple(section.blocks)
        if section.blocks is not None
        else evenly_spaced_blocks(len(backbone.blocks), section.stages)
    )
    names = [t["name"] for t in tasks]
    dim = backbone.embed_dim
    if dim % section.reduction:
        raise ValueError(f"model.bdta.reduction {section.reduction} must divide the backbone width {dim}")
    stages = nn.ModuleList(
        BDTA(
            dim,
            names,
            reduction=section.reduction,
            num_heads=section.num_heads,
            ffn_ratio=section.ffn_ratio,
            bottleneck_ratio=section.bottleneck_ratio,
        )
        for _ in blocks
    )
    mote_dim = section.mote_dim or dim // section.reduction
    mote = MoTE(
        [dim] * len(blocks),
        mote_dim,
        names,
        router_hidden_dim=max(1, round(dim * section.router_ratio)),
        noisy_gating=section.noisy_gating,
    )
    grid = (height // patch, width // patch)
    heads = build_task_heads(cfg, tasks, mote_dim, grid)
    return BDTAMoTE(
        backbone=backbone,
        stages=stages,
        mote=mote,
        heads=heads,
        task_kinds={t["name"]: t["kind"] for t in tasks},
        blocks=blocks,
        pixel_mean=tuple(cfg.pixel_mean),
        pixel_std=tuple(cfg.pixel_std),
    )
