"""The SAK family (`model.family: sak`): the builder registered in `training.builders.shared.FAMILIES`, and stage 1.

Paper: shared/papers/sak.md; facts and decisions: shared/MODEL_NOTES.md §2. Two stages, both `endostream train`:

- stage 1 (`model.sak.stage: 1`, config `sak_stage1`): distillation only, on any unlabeled frames (a folder of images
  and/or videos, `--data`); the student is the stem + TSAPs (+ aligners). `train_stage1` runs it, keeps a held-out
  share of the frames and reports the paper's "Rep Sim" (cosine between TSAP outputs and teacher features) on them.
- stage 2 (`model.sak.stage: 2`): the ordinary multi-task trainer with task losses + gamma * distillation through
  the model's `auxiliary_losses`; `model.sak.init_from` starts it from a stage-1 checkpoint.

Teachers are built from `model.sak.teachers` with `training.build_backbone` (DINOv2, CLIP, SAM, tiny test variants),
frozen, and given a disk cache of their features (`training.distill.cache`) keyed by their weights and view, so each
runs once per image. `model.backbone.freeze` and the TESLA rank are not used by SAK: `model.sak.tas` says how the
stem trains (all weights, the shared LoRA of `model.adapters`, or frozen).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from training.adapters.tuner import AdapterConfig, apply_adapters, iter_adapter_layers, mark_only_adapters_trainable
from training.builders.backbones import build_backbone
from training.builders.shared import build_configured_backbone, check_image_size
from training.config import ExperimentConfig, ModelConfig, SAKSection, TeacherSpec, write_config
from training.distill.cache import TeacherFeatureCache, collate_images, default_cache_dir, teacher_fingerprint
from training.distill.teachers import TeacherBank, TeacherView, distillation_losses, evenly_spaced_levels
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
    """Build SAK for `tasks` (none in stage 1); the signature of `training.builders.shared.build_endoarss`.

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
    from training.adapters.tuner import merge_and_unload
    from training.checkpoint import load_checkpoint

    source = load_checkpoint(path).model
    if not isinstance(source, SAK):
        raise ValueError(f"model.sak.init_from {path} holds a {type(source).__name__} checkpoint, not SAK")
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


# ---------------------------------------------------------------------------------------------------------- stage 1
def holdout_split(names: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: the `fraction` of frames with the smallest name hashes (stable across runs)."""
    count = len(names)
    held = round(fraction * count)
    if fraction > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    order = sorted(range(count), key=lambda i: hashlib.sha1(names[i].encode()).hexdigest())
    chosen = set(order[:held])
    return [i for i in range(count) if i not in chosen], sorted(chosen)


@torch.inference_mode()
def held_out_scores(model: SAK, dataset: Any, batch_size: int) -> dict[str, Any]:
    """Mean distillation loss and Rep Sim (per teacher and their mean) of `model` over `dataset`."""
    from training.distill.teachers import representation_similarity

    was_training = model.training
    model.eval()
    device = model.pixel_mean.device
    loss_sum, images = 0.0, 0
    similarity: dict[str, float] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_images):
        batch = batch.to(device)
        student, targets = model.distill_features(batch), model.teacher_targets(batch)
        loss_sum += float(sum(distillation_losses(student, targets).values())) * len(batch)
        for key, values in representation_similarity(student, targets).items():
            similarity[key] = similarity.get(key, 0.0) + float(values.sum())
        images += len(batch)
    model.train(was_training)
    rep_sim = {key: value / max(images, 1) for key, value in similarity.items()}
    rep_sim["mean"] = sum(rep_sim.values()) / max(len(rep_sim), 1)
    return {"distill": loss_sum / max(images, 1), "rep_sim": rep_sim, "images": images}


def train_stage1(
    cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False, device: str | None = None, progress: bool = True
) -> Any:
    """SAK stage 1: distil the teachers into stem + TSAPs on the unlabeled frames of `cfg.data.root`.

    Run folder: `config.yaml`, `metrics.jsonl` (per epoch: train loss per teacher, held-out loss and Rep Sim),
    `last/` (+ `trainer_state.pt`) and `best/` (highest held-out Rep Sim); stage 2 starts from either with
    `model.sak.init_from`. Returns the trainer's `TrainResult`.
    """
    from training.builders.shared import build_model
    from training.checkpoint import save_checkpoint
    from training.data.unlabeled import UnlabeledFrames
    from training.engine.distributed import average_gradients, barrier, broadcast_module, init_distributed, shutdown
    from training.engine.trainer import STATE_FILE, TrainResult, build_optimizer, build_scheduler, seed_everything

    if cfg.data.root is None:
        raise ValueError("data.root is not set: pass --data DIR (a folder of images and/or videos) for stage 1")
    if not cfg.model.sak.teachers:
        raise ValueError("SAK stage 1 distils teachers: list them in model.sak.teachers")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ctx = init_distributed(device)
    seed_everything(cfg.train.seed)
    started = time.perf_counter()
    frames = UnlabeledFrames(cfg.data.root, cfg.model.image_size, video_stride=cfg.model.sak.video_stride)
    train_idx, held_idx = holdout_split(frames.names, cfg.model.sak.holdout)
    train_set = Subset(frames, train_idx)
    held_set = Subset(frames, held_idx) if held_idx else train_set
    if not held_idx:
        logger.warning(
            "no held-out frames (%d frames, holdout %.2f): Rep Sim is measured on the training frames",
            len(frames),
            cfg.model.sak.holdout,
        )
    model = build_model(cfg.model, []).to(ctx.device)
    if cfg.model.backbone.checkpoint is not None:
        from training.builders.shared import resolved_backbone_overrides

        cfg.model.backbone.overrides = resolved_backbone_overrides(model.backbone)
    broadcast_module(model, ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, seed=cfg.train.seed) if ctx.enabled else None
    loader = DataLoader(
        train_set,
        batch_size=cfg.train.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_images,
        drop_last=len(train_set) >= cfg.train.batch_size * ctx.world_size,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, max(1, len(loader)))
    if isinstance(model.feature_source, TeacherFeatureCache):
        model.feature_source.fill(frames, batch_size=cfg.train.batch_size, progress=progress and ctx.is_main)
    start_epoch, best = 0, {"score": -math.inf, "epoch": -1, "metrics": {}}
    state_path = run_dir / "last" / STATE_FILE
    if resume and state_path.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(run_dir / "last" / "model.safetensors"), device=str(ctx.device)))
        state = torch.load(state_path, map_location=ctx.device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        logger.info("resumed stage 1 from %s at epoch %d", run_dir / "last", start_epoch)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, run_dir / "config.yaml")
        logger.info(
            "SAK stage 1 %s: %d training / %d held-out frames, teachers %s, %s trainable parameters",
            cfg.name,
            len(train_set),
            len(held_idx),
            list(model.paths),
            f"{sum(p.numel() for p in params):,}",
        )
    labels = {"tasks": [], "source": {"stage": 1, "frames": str(cfg.data.root), "count": len(frames)}}
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.train.epochs):
        epoch_start = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        totals: dict[str, float] = {}
        steps = 0
        bar = tqdm(
            loader,
            desc=f"stage 1 epoch {epoch + 1}/{cfg.train.epochs}",
            disable=not (progress and ctx.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        for images in bar:
            images = images.to(ctx.device)
            terms = distillation_losses(model.distill_features(images), model.teacher_targets(images))
            loss = torch.stack(list(terms.values())).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params, ctx)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            for name, value in terms.items():
                key = f"loss.distill.{name.split('/')[0]}"
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            steps += 1
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if ctx.is_main:
            scores = held_out_scores(model, held_set, cfg.train.eval_batch_size)
            score = scores["rep_sim"]["mean"]
            record = {
                "epoch": epoch + 1,
                **{key: value / max(1, steps) for key, value in totals.items()},
                "val": scores,
                "val_score": score,
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - epoch_start, 2),
            }
            with (run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            meta = {"epoch": epoch + 1, "val": scores}
            last = save_checkpoint(model, cfg, labels, run_dir / "last", meta=meta)
            improved = score > best["score"]
            if improved:
                best = {"score": score, "epoch": epoch + 1, "metrics": scores}
                save_checkpoint(model, cfg, labels, run_dir / "best", meta=meta)
            state = {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best": best,
            }
            torch.save(state, last / STATE_FILE)
            logger.info(
                "stage 1 epoch %d: held-out distill %.4f, Rep Sim %s%s (%.0fs)",
                epoch + 1,
                scores["distill"],
                {k: round(v, 4) for k, v in scores["rep_sim"].items()},
                " *best*" if improved else "",
                record["seconds"],
            )
        barrier(ctx)
        limit = cfg.train.time_limit_minutes
        if limit is not None and (time.perf_counter() - started) / 60 >= limit:
            logger.warning("time limit of %.1f min reached after epoch %d", limit, epoch + 1)
            break
    shutdown(ctx)
    seconds = time.perf_counter() - started
    # Stage 1 writes no merged checkpoint: stage 2 starts from RUN/best (model.sak.init_from).
    return TrainResult(run_dir, best["epoch"], best["score"], best["metrics"], epoch + 1, seconds, run_dir / "best")
