"""The SAK family (`model.family: sak`): the builder registered in `training.builders.registry.FAMILIES`.

Paper: shared/papers/sak.md; facts and decisions: shared/MODEL_NOTES.md §2. Two stages, both `endostream train`:

- stage 1 (`model.sak.stage: 1`, config `sak_stage1`): distillation only, on any unlabeled frames (a folder of images
  and/or videos, `--data`); the student is the stem + TSAPs (+ aligners). `training.engine.stage1.Stage1Trainer`
  runs it, keeps a held-out share of the frames and reports the paper's "Rep Sim" (cosine between TSAP outputs and
  teacher features) on them.
- stage 2 (`model.sak.stage: 2`): the ordinary multi-task trainer with task losses + gamma * distillation through
  the model's `auxiliary_losses`; `model.sak.init_from` starts it from a stage-1 checkpoint.

Teachers are built from `model.sak.teachers` with `training.build_backbone` (DINOv2, CLIP, SAM, tiny test variants),
frozen, and given a disk cache of their features (`training.distill.cache`) keyed by their weights and view, so each
runs once per image. `model.backbone.freeze` and the TESLA rank are not used by SAK: `model.sak.tas` says how the
stem trains (all weights, the shared LoRA of `model.adapters`, or frozen).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.adapters.tuner import (
    AdapterConfig,
    apply_adapters,
    iter_adapter_layers,
    mark_only_adapters_trainable,
    merge_and_unload,
)
from training.builders.backbones import build_backbone
from training.builders.shared import build_configured_backbone, check_image_size
from training.checkpoint_format import read_checkpoint_files
from training.config import ModelConfig, SAKSection, TeacherSpec
from training.distill.cache import TeacherFeatureCache, default_cache_dir, teacher_fingerprint
from training.distill.teachers import TeacherBank, TeacherView, evenly_spaced_levels
from training.models.sak import SAK, MoRRouter, MultiLevelSegmentationHead, PooledActivityHead, TeacherSpecificPath
from training.models.vit import VisionTransformer

logger = logging.getLogger(__name__)

STEM_TASK = "stem"  # adapter name of a LoRA-tuned stem when the model has no task (stage 1)


# ------------------------------------------------------------------------------------------------------------ build
def build(
    cfg: ModelConfig,
    tasks: Sequence[dict[str, Any]],
    *,
    load_backbone_weights: bool = True,
    merged: bool = False,
) -> SAK:
    """Build SAK for `tasks` (none in stage 1); the signature of `training.builders.endoarss.build`.

    With `load_backbone_weights` the stem checkpoint, the teachers and `model.sak.init_from` are loaded and the teacher
    feature cache is attached; without it (a checkpoint follows) only the student is built, with aligner widths taken
    from `model.sak.teachers[*].dim`, which building with teachers records.
    """
    sak = cfg.sak
    # SAK trains its student stem whatever model.backbone.freeze says
    backbone = build_configured_backbone(cfg.backbone, load_weights=load_backbone_weights, frozen=False)
    if not isinstance(backbone, VisionTransformer):
        raise ValueError(
            f"model.backbone.name {cfg.backbone.name!r} builds a {type(backbone).__name__}; the SAK stem must be a "
            "ViT with class token (dinov2_*, vit_tiny_*); SAM and CLIP encoders belong in model.sak.teachers"
        )
    height, width = check_image_size(cfg, backbone.patch_size)
    levels = sak.levels if sak.levels is not None else evenly_spaced_levels(len(backbone.blocks))
    teachers = build_teachers(sak.teachers, len(levels)) if load_backbone_weights else None
    unknown = [spec.key for spec in sak.teachers if spec.dim is None]
    if unknown:
        raise ValueError(f"model.sak.teachers {unknown} have no recorded `dim`; build with the teachers first")
    dim = backbone.embed_dim
    paths = nn.ModuleDict(
        {spec.key: TeacherSpecificPath(dim, levels[-1] + 1, len(levels), sak.tsap_reduction) for spec in sak.teachers}
    )
    aligners = _aligners(sak, dim, len(levels))
    if load_backbone_weights and sak.init_from:
        load_stage1(sak.init_from, backbone, paths, aligners)
    names = [t["name"] for t in tasks]
    if sak.tas == "lora" and not merged:  # merged: the shared LoRA was folded into plain Linears of the same shape
        apply_adapters(backbone, _lora_config(cfg, names))
        mark_only_adapters_trainable(backbone)
    elif sak.tas == "frozen":
        backbone.requires_grad_(False)
    experts = len(paths) + int(sak.stem_expert)
    routers = None
    if sak.router == "mor":
        routers = nn.ModuleDict(
            {name: nn.ModuleList(MoRRouter(dim, experts, sak.noisy_gating) for _ in levels) for name in names}
        )
    heads = nn.ModuleDict()
    for task in tasks:
        classes = len(task["classes"])
        if task["kind"] == "segmentation":
            heads[task["name"]] = MultiLevelSegmentationHead(
                dim, len(levels), classes, channels=cfg.heads.segmentation_channels, dropout=cfg.heads.dropout
            )
        else:
            heads[task["name"]] = PooledActivityHead(
                dim, len(levels), classes, channels=cfg.heads.activity_channels, pool=cfg.heads.activity_pool
            )
    model = SAK(
        backbone=backbone,
        paths=paths,
        heads=heads,
        task_kinds={t["name"]: t["kind"] for t in tasks},
        levels=levels,
        routers=routers,
        stem_expert=sak.stem_expert,
        aligners=aligners,
        teachers=teachers,
        gamma=sak.gamma if sak.stage == 2 else 0.0,
        pixel_mean=tuple(cfg.pixel_mean),
        pixel_std=tuple(cfg.pixel_std),
    )
    if teachers is not None and len(teachers) and sak.cache and (sak.stage == 1 or sak.gamma > 0):
        model.feature_source = _feature_cache(model, teachers, cfg)
    return model


def build_teachers(specs: Sequence[TeacherSpec], num_levels: int) -> TeacherBank:
    """Frozen teachers of `specs`, each with `num_levels` feature levels; records each width in `spec.dim`.

    A teacher without checkpoint is initialised from `spec.seed` alone, so the same spec gives the same weights
    (and the same cache fingerprint) in every run and stage.
    """
    bank = TeacherBank()
    for spec in specs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            teacher = build_backbone(spec.name, spec.checkpoint, **dict(spec.overrides))
        try:
            levels = spec.levels if spec.levels is not None else evenly_spaced_levels(len(teacher.blocks), num_levels)
        except ValueError as err:
            raise ValueError(f"teacher {spec.key} ({spec.name}): {err}; set its `levels` or use a deeper one") from err
        if len(levels) != num_levels:
            raise ValueError(f"teacher {spec.key}: {len(levels)} levels {list(levels)}, the student has {num_levels}")
        resize = spec.resize
        if resize == "auto":
            resize = "longest_pad" if spec.name.startswith("sam") else "keep_aspect"
        width = int(teacher.embed_dim)  # block outputs, the distillation targets, have the token width
        if spec.dim is not None and spec.dim != width:
            raise ValueError(
                f"teacher {spec.key} has width {width} but the config records dim={spec.dim} (another checkpoint?); "
                "the student's aligners were built for the recorded width"
            )
        spec.dim = width
        bank.add(spec.key, teacher, TeacherView(spec.input_size, resize, tuple(levels), spec.norm, spec.max_grid))
        logger.info(
            "teacher %s: %s (%s), input %d px (%s), levels %s",
            spec.key,
            spec.name,
            spec.checkpoint or f"random init, seed {spec.seed}",
            spec.input_size,
            resize,
            list(levels),
        )
    return bank


def _aligners(sak: SAKSection, dim: int, num_levels: int) -> nn.ModuleDict | None:
    if not sak.aligners:
        wrong = {spec.key: spec.dim for spec in sak.teachers if spec.dim != dim}
        if wrong:
            raise ValueError(f"model.sak.aligners=false needs teachers of the stem's width {dim}; got {wrong}")
        return None
    aligners = nn.ModuleDict()
    for spec in sak.teachers:
        layers = nn.ModuleList(nn.Linear(dim, int(spec.dim)) for _ in range(num_levels))
        for layer in layers:
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        aligners[spec.key] = layers
    return aligners


def _lora_config(cfg: ModelConfig, task_names: Sequence[str]) -> AdapterConfig:
    section = cfg.adapters
    if section.shared_rank < 1:
        raise ValueError("model.sak.tas=lora needs model.adapters.shared_rank >= 1 (the stem's LoRA rank)")
    return AdapterConfig(
        tasks=tuple(task_names) or (STEM_TASK,),  # merged_copy folds the shared LoRA under the first task
        shared_rank=section.shared_rank,
        task_rank=0,  # one stem pass serves every task: no per-task streams
        alpha=section.alpha,
        dropout=section.dropout,
        targets=tuple(section.targets),
        layers=tuple(section.layers) if section.layers is not None else None,
    )


def _feature_cache(model: SAK, teachers: TeacherBank, cfg: ModelConfig) -> TeacherFeatureCache:
    sak = cfg.sak
    specs = {spec.key: spec for spec in sak.teachers}
    descriptions = {
        key: {
            "name": specs[key].name,
            "checkpoint": specs[key].checkpoint,
            "overrides": specs[key].overrides,
            "view": teachers.views[key].to_dict(),
            "pixel_mean": list(cfg.pixel_mean),
            "pixel_std": list(cfg.pixel_std),
        }
        for key in teachers
    }
    fingerprints = {
        key: teacher_fingerprint(teachers[key], {**descriptions[key], "dtype": sak.cache_dtype}) for key in teachers
    }
    root = Path(sak.cache_dir) if sak.cache_dir else default_cache_dir()
    return TeacherFeatureCache(
        root, fingerprints, model.teacher_features, dtype=sak.cache_dtype, descriptions=descriptions
    )


def load_stage1(path: str | Path, backbone: nn.Module, paths: nn.ModuleDict, aligners: nn.ModuleDict | None) -> None:
    """Copy a stage-1 checkpoint's stem (LoRA folded), TSAPs and aligners into fresh modules, before LoRA is added.

    Teachers missing from the checkpoint keep their fresh TSAP (warned); a stem of another shape is an error.
    """
    files = read_checkpoint_files(path)
    if files.config.model.family != "sak":
        raise ValueError(f"model.sak.init_from {path} holds a {files.config.model.family} checkpoint, not SAK")
    source = build(files.config.model, files.labels["tasks"], load_backbone_weights=False, merged=files.merged)
    try:
        source.load_state_dict(files.state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{path} does not match the architecture in its config.json: {err}") from err
    stem = source.backbone
    layers = [layer for _, layer in iter_adapter_layers(stem)]
    if layers:
        stem = merge_and_unload(stem, layers[0].tasks[0])
    try:
        backbone.load_state_dict(stem.state_dict(), strict=True)
        for key, path_module in paths.items():
            if key not in source.paths:
                logger.warning("init_from %s has no TSAP for teacher %s; it starts fresh", path, key)
                continue
            path_module.load_state_dict(source.paths[key].state_dict(), strict=True)
            if aligners is not None and source.aligners is not None and key in source.aligners:
                aligners[key].load_state_dict(source.aligners[key].state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"model.sak.init_from {path} does not fit this model (stem, levels or teachers): {err}"
        ) from err
    logger.info("stage 2 starts from stage-1 checkpoint %s (teachers %s)", path, list(source.paths))
